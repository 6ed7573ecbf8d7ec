"""Which parameters train: patterns, --freeze-first, the user's own requires_grad, the phases."""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from ..checkpoint import in_module
from ..errors import UsageError
from .options import FinetuneOptions, learning_rate
from .report import ModuleParams

_RANGE = re.compile(r"^([A-Za-z_]*)(\d+)-(\d+)$")


def expand_pattern(pattern: str) -> list[str]:
    """``features.0-3`` -> ``[features.0, ..., features.3]``; ``layer1-2`` -> ``[layer1, layer2]``; others unchanged."""
    parts = pattern.split(".")
    for i, part in enumerate(parts):
        m = _RANGE.match(part)
        if m and not pattern.startswith("re:"):
            lo, hi = int(m.group(2)), int(m.group(3))
            if lo > hi:
                raise UsageError(f"{pattern!r}: range {part} runs backwards")
            return [".".join(parts[:i] + [f"{m.group(1)}{n}"] + parts[i + 1 :]) for n in range(lo, hi + 1)]
    return [pattern]


def matches(name: str, pattern: str) -> bool:
    """Does parameter ``name`` fall under ``pattern``: a module path, a glob, or ``re:REGEX``?

    Example:
        >>> matches("features.3.weight", "features.3"), matches("layer4.0.conv1.weight", "layer4.*")
        (True, True)
    """
    if pattern.startswith("re:"):
        return re.search(pattern[3:], name) is not None
    if in_module(name, pattern):
        return True
    return any(c in pattern for c in "*?[") and (
        fnmatch.fnmatchcase(name, pattern) or fnmatch.fnmatchcase(name, pattern + ".*")
    )


def select_trainable(
    model: Any, freeze: Iterable[str] = (), trainable: Iterable[str] = (), freeze_first: int | None = None
) -> frozenset[str]:
    """The names of the parameters left trainable by the freezing options."""
    names = [n for n, _ in model.named_parameters()]
    freeze = list(freeze) + _first_layers(model, freeze_first)
    selected = set(names)
    if trainable:
        selected = set()
        for pattern in trainable:
            selected |= _select(names, pattern, "--trainable", model)
    for pattern in freeze:
        selected -= _select(names, pattern, "--freeze", model)
    return frozenset(selected)


def _select(names: list[str], pattern: str, option: str, model: Any) -> set[str]:
    if pattern.startswith("re:"):
        try:
            re.compile(pattern[3:])
        except re.error as exc:
            raise UsageError(f"{option} {pattern!r}: bad regular expression ({exc})") from None
    hits = {n for p in expand_pattern(pattern) for n in names if matches(n, p)}
    if not hits:
        top = ", ".join(n for n, _ in model.named_children())
        raise UsageError(f"{option} {pattern!r} matches no parameter (top-level modules: {top})")
    return hits


def _first_layers(model: Any, n: int | None) -> list[str]:
    if not n:
        return []
    # "the first N layers of features": the first top-level block when the model has one
    children = dict(model.named_children())
    block_name = "features" if "features" in children else ""
    block = children.get("features", model)
    layers = [f"{block_name}.{name}" if block_name else name for name, _ in block.named_children()]
    if n > len(layers):
        raise UsageError(f"--freeze-first {n}: {block_name or 'the model'} has only {len(layers)} layers")
    with_params = [p for p in layers[:n] if any(True for _ in model.get_submodule(p).parameters())]
    return with_params


@dataclass(frozen=True)
class PhaseSpec:
    name: str
    trainable: frozenset[str]
    epochs: int
    lr: float


def model_frozen(model: Any) -> frozenset[str]:
    """The parameters the model itself was built with ``requires_grad=False`` (a factory that freezes its body)."""
    return frozenset(n for n, p in model.named_parameters() if not p.requires_grad)


def phase_plan(
    model: Any, opts: FinetuneOptions, heads: tuple[str, ...], frozen_by_model: frozenset[str] = frozenset()
) -> list[PhaseSpec]:
    """The phases and what trains in each. What the model froze stays frozen unless ``train_frozen``."""
    kept = frozenset() if opts.train_frozen else frozen_by_model
    chosen = select_trainable(model, opts.freeze, opts.trainable, opts.freeze_first) - kept
    if not opts.freeze_epochs:
        return [PhaseSpec("train", chosen, opts.epochs, learning_rate(opts))]
    everything = frozenset(n for n, _ in model.named_parameters()) - kept
    if not (opts.freeze or opts.trainable or opts.freeze_first):  # the schedule's first phase trains the head alone
        if not heads[0]:
            raise UsageError("--freeze-epochs: no head found to train alone", hint="name it with --head or --trainable")
        chosen = select_trainable(model, trainable=[h.rpartition(".")[0] or h for h in heads]) - kept
    unfreeze_lr = opts.unfreeze_lr if opts.unfreeze_lr is not None else learning_rate(opts) / 10
    return [
        PhaseSpec("frozen", chosen, opts.freeze_epochs, learning_rate(opts)),
        PhaseSpec("unfrozen", everything, opts.epochs - opts.freeze_epochs, unfreeze_lr),
    ]


def apply_trainable(model: Any, trainable: frozenset[str]) -> None:
    for name, p in model.named_parameters():
        p.requires_grad_(name in trainable)


def param_table(model: Any, frozen_by_model: frozenset[str] = frozenset()) -> tuple[ModuleParams, ...]:
    """Trainable and frozen counts per top-level module, as the flags stand now."""
    rows: dict[str, list[int]] = {}
    for name, p in model.named_parameters():
        row = rows.setdefault(name.split(".", 1)[0], [0, 0, 0])
        row[0 if p.requires_grad else 1] += p.numel()
        if not p.requires_grad and name in frozen_by_model:
            row[2] += p.numel()
    return tuple(ModuleParams(m, t, f, b) for m, (t, f, b) in rows.items())
