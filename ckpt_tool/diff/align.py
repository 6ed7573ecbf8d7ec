"""Remap by position: pair the keys left unmatched on both sides by their order in the state dicts.

A re-implementation of a network, or a port from another framework, names every module differently
but registers the same layers in the same order, so the unmatched keys of both sides show the same
sequence of shapes (timm's ``remap_state_dict`` pairs them by position on that ground). Where the
sequences differ in places, a sequence diff over (shape, leaf name) pairs the runs that agree and
leaves the rest (allennlp aligned (name, shape) sequences the same way).
"""

from __future__ import annotations

import difflib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

POSITION, SEQUENCE_DIFF = "position", "sequence diff"
MIN_PAIRS = 2  # one lone pair of equal shapes is a coincidence more often than a port
# a sequence diff is quadratic at worst (repeated layers repeat their shapes): past this, equal sequences only
MAX_DIFF_KEYS = 5000
MIN_COVERAGE = 0.5  # a partial alignment pairs at least this share of the longer side, or is no alignment


@dataclass(frozen=True)
class Pair:
    """A checkpoint key paired with a target key of the same shape; ``same_leaf``: the last components agree too."""

    source: str
    target: str
    shape: tuple[int, ...]
    same_leaf: bool


@dataclass(frozen=True)
class Alignment:
    """The pairing of unmatched keys, and how far to trust it.

    ``confidence`` is coverage x name agreement: the share of the longer side's unmatched keys that
    are paired, times (1 + the share of pairs whose leaf names agree) / 2. Equal shape sequences with
    equal leaf names give 1.0; equal shapes under entirely other leaf names, 0.5.
    """

    pairs: tuple[Pair, ...]
    unaligned_source: tuple[str, ...]
    unaligned_target: tuple[str, ...]
    method: str
    confidence: float

    @property
    def mapping(self) -> dict[str, str]:
        return {p.source: p.target for p in self.pairs}

    def to_json(self) -> dict[str, Any]:
        return {
            "method": self.method,
            "confidence": self.confidence,
            "pairs": [
                {"source": p.source, "target": p.target, "shape": list(p.shape), "same_leaf": p.same_leaf}
                for p in self.pairs
            ],
            "unaligned_source": list(self.unaligned_source),
            "unaligned_target": list(self.unaligned_target),
        }


def align(
    source: Sequence[tuple[str, tuple[int, ...]]], target: Sequence[tuple[str, tuple[int, ...]]]
) -> Alignment | None:
    """Pair ``(key, shape)`` sequences (state-dict order): whole by position when the shapes agree in sequence,
    else the runs of two or more that a sequence diff over (shape, leaf name) aligns; ``None`` when fewer
    than two pairs align, or a sequence diff pairs under half of the longer side.

    Example:
        >>> a = align([("stem.w", (8, 3)), ("stem.b", (8,))], [("conv1.weight", (8, 3)), ("conv1.bias", (8,))])
        >>> a.mapping, a.method, a.confidence
        ({'stem.w': 'conv1.weight', 'stem.b': 'conv1.bias'}, 'position', 0.5)
    """
    if not source or not target:
        return None
    if [tuple(s) for _, s in source] == [tuple(s) for _, s in target]:
        indices = [(i, i) for i in range(len(source))]
        method = POSITION
    elif max(len(source), len(target)) > MAX_DIFF_KEYS:
        return None
    else:
        a = [(tuple(s), _leaf(k)) for k, s in source]
        b = [(tuple(s), _leaf(k)) for k, s in target]
        matcher = difflib.SequenceMatcher(None, a, b, autojunk=False)
        # runs only: one equal (shape, name) between unrelated layers is a coincidence, not an alignment
        indices = [
            (block.a + j, block.b + j)
            for block in matcher.get_matching_blocks()
            if block.size >= MIN_PAIRS
            for j in range(block.size)
        ]
        method = SEQUENCE_DIFF
        if len(indices) < MIN_COVERAGE * max(len(source), len(target)):
            return None
    if len(indices) < MIN_PAIRS:
        return None
    pairs = tuple(
        Pair(source[i][0], target[j][0], tuple(source[i][1]), _leaf(source[i][0]) == _leaf(target[j][0]))
        for i, j in indices
    )
    paired_a, paired_b = {i for i, _ in indices}, {j for _, j in indices}
    coverage = len(pairs) / max(len(source), len(target))
    names = sum(p.same_leaf for p in pairs) / len(pairs)
    return Alignment(
        pairs,
        tuple(k for i, (k, _) in enumerate(source) if i not in paired_a),
        tuple(k for j, (k, _) in enumerate(target) if j not in paired_b),
        method,
        round(coverage * (1 + names) / 2, 3),
    )


def _leaf(key: str) -> str:
    return key.rpartition(".")[2]
