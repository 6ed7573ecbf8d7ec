"""The fix plan: ``ckpt migrate`` operations that make a checkpoint load strictly, with a reason for each.

The plan grows through :data:`PROPOSERS`, in order: each reads what is still unmatched in a
:class:`Proposal` and adds steps (prefixes, leaf renames, module renames, a map by position, drops,
fills). A new kind of fix is one more proposer in that list.
"""

from __future__ import annotations

import functools
import os
import re
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

from ..arch import TargetSignature
from ..checkpoint import Checkpoint, common_prefix, in_module
from ..compat import MOSTLY_NEW_SHARE, parameter_share, shapes_load
from ..formats import sniff as fmt
from ..plan import Plan
from ..plan import operation as plan_operation
from ..text import some
from .adapt import adaptation_steps
from .align import Alignment, align
from .report import FixPlan, PlanStep
from .rows import is_index
from .shapeflow import ShapeFlow

# more drop prefixes than this and the plan says --drop-unexpected instead
MAX_DROP_PREFIXES = 4
# more module renames than this, and a map by position that agrees with each of them, and the map is proposed
MAX_RENAME_RULES = 4

Shapes = dict[str, tuple[int, ...]]


@dataclass
class Proposal:
    """The plan as it grows. ``current`` is the checkpoint's key -> shape after the steps so far."""

    source: Checkpoint
    target: TargetSignature
    arch: str | None
    optional: frozenset[str]
    current: Shapes
    map_file: str
    steps: list[PlanStep] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    alignment: Alignment | None = None

    @functools.cached_property
    def tgt(self) -> Shapes:
        return {k: t.shape for k, t in self.target.tensors.items()}

    def settled(self) -> bool:
        """Whether every key already matches its place one to one with a shape that loads: nothing to propose."""
        tgt, current = self.tgt, self.current
        return len(current) == len(tgt) and all(k in tgt and shapes_load(s, tgt[k]) for k, s in current.items())

    def unexpected(self) -> list[str]:
        """Checkpoint keys (as renamed so far) the target has no place for, in the checkpoint's order."""
        return [k for k in self.current if k not in self.target.tensors]

    def absent(self) -> list[str]:
        """Target keys no checkpoint key has yet, in the target's order (torch's fill-ins included)."""
        return [k for k in self.target.tensors if k not in self.current]

    def add(self, operation: dict[str, Any], reason: str, keys: int, current: Shapes | None = None) -> None:
        self.steps.append(PlanStep(operation, reason, keys))
        if current is not None:
            self.current = current


Proposer = Callable[[Proposal], None]


def suggest_plan(
    source: Checkpoint,
    target: TargetSignature,
    *,
    arch: str | None,
    arch_args: dict[str, Any],
    optional: set[str] | frozenset[str] = frozenset(),
    map_file: str | None = None,
) -> FixPlan:
    """The ``ckpt migrate`` operations that make ``source`` load strictly into ``target``, with reasons.

    Prefixes first (``module.``, ``_orig_mod.``, ``backbone.``...), then leaf renames of known
    equivalences (``LayerNorm.gamma`` -> ``LayerNorm.weight``), then renames of whole modules whose
    keys and shapes match one to one in order, then a ``--map`` pairing the rest by position (written
    to ``map_file`` by ``ckpt diff --map-out``), then drops, then (with an architecture to take values
    from) ``fill_missing`` and ``reinit_mismatched``. ``optional`` target keys may stay absent (torch
    fills them); so may a tied key whose partner loads. When under half of an architecture's
    parameters would come from the checkpoint, no command is proposed (``mostly_new``): the
    checkpoint is likely not of this architecture.
    """
    work = Proposal(
        source,
        target,
        arch,
        frozenset(optional),
        {k: t.shape for k, t in source.tensors.items()},
        map_file or map_name(source.path),
    )
    settled = False
    for propose in PROPOSERS:
        settled = work.settled()
        if settled:  # the usual diff of two copies of one model: every proposer would find nothing
            break
        propose(work)
    return _finish(work, arch_args, settled)


def _placed(work: Proposal, settled: bool = False) -> tuple[set[str], list[str], list[str]]:
    """The target keys the proposal so far loads, leaves missing (a loaded tie partner places one), mismatches.

    ``settled``: :meth:`Proposal.settled` was just found true, so every target key loads from its own place.
    """
    if settled:
        return set(work.tgt), [], []
    tgt, current, partners = work.tgt, work.current, work.target.partners()
    loaded = {k for k in tgt if k in current and shapes_load(current[k], tgt[k])}
    missing = [
        k
        for k in tgt
        if k not in current and k not in work.optional and not any(p in loaded for p in partners.get(k, ()))
    ]
    return loaded, missing, [k for k in tgt if k in current and not shapes_load(current[k], tgt[k])]


def _finish(work: Proposal, arch_args: dict[str, Any], settled: bool = False) -> FixPlan:
    tgt, current = work.tgt, work.current
    loaded, missing, mismatched = _placed(work, settled)
    # drops cover every unexpected key they may; what is missing or mismatched needs a model to take values from
    left = [] if settled else [k for k in current if k not in tgt]
    resolves = not left and (work.arch is not None or not (missing or mismatched))
    operations = [s.operation for s in work.steps]
    plan = Plan(
        work.source.path,
        work.source.state_path or None,
        work.arch,
        dict(arch_args),
        tuple(plan_operation(op["op"], **{k: v for k, v in op.items() if k != "op"}) for op in operations),
    )
    share = parameter_share(work.target, loaded) if work.arch is not None else 1.0
    mostly_new = share < MOSTLY_NEW_SHARE
    command = plan.command() if operations and not mostly_new and not left else None
    return FixPlan(
        tuple(work.steps),
        plan.to_json(),
        command,
        resolves,
        tuple(work.notes),
        plan,
        round(share, 6),
        mostly_new,
        work.alignment,
        work.map_file if work.alignment is not None else None,
    )


def map_name(source: str) -> str:
    """The ``--map`` file a suggested command reads: ``a.pth`` -> ``a.map.json``."""
    base = source[: -len(".index.json")] if source.endswith(".index.json") else source.rstrip("/")
    return os.path.splitext(base)[0] + ".map.json"


def with_shape_flow(plan: FixPlan, flow: ShapeFlow | None) -> FixPlan:
    """A plan for a target whose forward fails: no key operation can fix it, so no command is offered."""
    if flow is None or not flow.fails:
        return plan
    where = f" at {flow.consumer}" if flow.consumer else ""
    why = f"no key operation can fix this: the target's own forward fails{where}; change the architecture, then diff again"
    return replace(plan, command=None, resolves=False, notes=(*plan.notes, why), cannot_run=flow.message)


# --- the proposers, in the order they run ---------------------------------------------------------


def propose_prefixes(work: Proposal) -> None:
    strip, add = _best_prefixes(list(work.current), work.tgt)
    n = len(work.current)
    if strip:
        stripped = [k for k in work.current if k.startswith(strip)]
        if len(stripped) == n:
            why = f"every checkpoint key starts with {strip!r}{_prefix_origin(strip)}"
        else:
            others = [k for k in work.current if not k.startswith(strip)]
            # torch.optim.swa_utils.AveragedModel keeps the model as .module beside its counter
            origin = " (saved from torch's AveragedModel)" if "n_averaged" in others else _prefix_origin(strip)
            why = (
                f"{len(stripped)} of {n} checkpoint keys start with {strip!r}{origin}; "
                f"the other {len(others)} keep their names ({some(others)})"
            )
        work.add({"op": "strip_prefix", "prefix": strip}, why, len(stripped))
    if add:
        held = sum(1 for k in work.tgt if k.startswith(add))
        whose = "every target key starts" if held == len(work.tgt) else f"{held} of {len(work.tgt)} target keys start"
        work.add({"op": "add_prefix", "prefix": add}, f"{whose} with {add!r}", n)
    work.current = _apply_prefixes(work.current, strip, add)


# one spelling, the other, and where both are found: proposed either way, when module path and shape agree
LEAF_EQUIVALENCES: tuple[tuple[str, str, str], ...] = (
    (
        "gamma",
        "weight",
        "gamma/beta are a norm layer's weight/bias in TF ports and BERT checkpoints from before "
        "PyTorch names (transformers renames LayerNorm.gamma/beta on load)",
    ),
    (
        "beta",
        "bias",
        "gamma/beta are a norm layer's weight/bias in TF ports and BERT checkpoints from before "
        "PyTorch names (transformers renames LayerNorm.gamma/beta on load)",
    ),
    ("moving_mean", "running_mean", "moving_mean/moving_variance are BatchNorm's running statistics in TF/Keras ports"),
    (
        "moving_variance",
        "running_var",
        "moving_mean/moving_variance are BatchNorm's running statistics in TF/Keras ports",
    ),
    (
        "weight_g",
        "parametrizations.weight.original0",
        "torch.nn.utils.weight_norm stores weight_g/weight_v, its "
        "parametrizations successor parametrizations.weight.original0/original1",
    ),
    (
        "weight_v",
        "parametrizations.weight.original1",
        "torch.nn.utils.weight_norm stores weight_g/weight_v, its "
        "parametrizations successor parametrizations.weight.original0/original1",
    ),
    ("scale", "weight", "Flax calls a norm layer's weight 'scale'"),
    ("embedding", "weight", "Flax calls an embedding's table 'embedding'"),
)


def propose_leaf_renames(work: Proposal) -> None:
    """Unexpected keys whose module path has, on the target's side, the same tensor under an equivalent leaf name."""
    absent = set(work.absent())
    tgt = work.tgt
    found: dict[tuple[str, str, str], list[tuple[str, str]]] = {}
    claimed: set[str] = set()
    for key in work.unexpected():
        for a, b, why in LEAF_EQUIVALENCES:
            hit = next(((old, new) for old, new in ((a, b), (b, a)) if key == old or key.endswith("." + old)), None)
            if hit is None:
                continue
            old, new = hit
            candidate = key[: len(key) - len(old)] + new
            if candidate in absent and candidate not in claimed and tgt[candidate] == work.current[key]:
                claimed.add(candidate)
                found.setdefault((old, new, why), []).append((key, candidate))
                break
    for (old, new, why), pairs in found.items():
        for pattern, replacement, members in _leaf_rules(old, new, pairs, work.current):
            shown = some(f"{o} -> {n} {list(work.current[o])}" for o, n in members)
            work.add(
                {"op": "rename", "pattern": pattern, "replacement": replacement},
                f"{len(members)} key{'s' * (len(members) != 1)} spelled {old!r} where the target has "
                f"{new!r}, same module path and shape ({shown}): {why}",
                len(members),
                _apply_renames(work.current, [(pattern, replacement)]),
            )


def _leaf_rules(
    old: str, new: str, pairs: list[tuple[str, str]], current: Shapes
) -> list[tuple[str, str, list[tuple[str, str]]]]:
    """The most general exact rule: every ``.gamma``; else every ``LayerNorm.gamma``; else key by key."""
    wanted = dict(pairs)
    everywhere = (r"(^|\.)" + re.escape(old) + "$", r"\g<1>" + new)
    if _renames_exactly(*everywhere, wanted, current):
        return [(*everywhere, pairs)]
    rules: list[tuple[str, str, list[tuple[str, str]]]] = []
    by_parent: dict[str, list[tuple[str, str]]] = {}
    for o, n in pairs:
        by_parent.setdefault(o.split(".")[-2] if o.count(".") >= 1 else "", []).append((o, n))
    for parent, members in by_parent.items():
        scoped = (r"(^|\.)" + re.escape(f"{parent}.{old}") + "$", r"\g<1>" + f"{parent}.{new}")
        if parent and _renames_exactly(*scoped, dict(members), current):
            rules.append((*scoped, members))
        else:
            rules.extend(("^" + re.escape(o) + "$", n, [(o, n)]) for o, n in members)
    return rules


def _renames_exactly(pattern: str, replacement: str, wanted: dict[str, str], current: Shapes) -> bool:
    rx = re.compile(pattern)
    return all(rx.sub(replacement, k, count=1) == wanted.get(k, k) for k in current)


def propose_module_renames(work: Proposal) -> None:
    renames, notes = _renames(work.current, work.tgt)
    if len(renames) > MAX_RENAME_RULES and not _order_lost(work) and _position_map_agrees(work, renames):
        return  # a re-implementation: one map by position says the same as rule after rule
    work.notes += notes
    for pattern, replacement, pairs in renames:
        work.add(
            {"op": "rename", "pattern": pattern, "replacement": replacement},
            _rename_reason(pairs),
            sum(len(_module_keys(work.current, o)) for o, _ in pairs),
        )
    work.current = _apply_renames(work.current, [(p, r) for p, r, _ in renames])


def _position_map_agrees(work: Proposal, renames: list[tuple[str, str, list[tuple[str, str]]]]) -> bool:
    """Whether the alignment by position pairs every key the module renames move, each where they put it."""
    current, tgt = work.current, work.tgt
    alignment = align([(k, current[k]) for k in work.unexpected()], [(k, tgt[k]) for k in work.absent()])
    if alignment is None:
        return False
    renamed = _apply_renames(current, [(p, r) for p, r, _ in renames])
    return all(alignment.mapping.get(old, old) == new for old, new in zip(current, renamed) if old != new)


def propose_adaptations(work: Proposal) -> None:
    """Value and depth changes (input conv, position embedding, repeated blocks) that are the whole difference."""
    steps, work.current, notes = adaptation_steps(work.current, work.target, work.arch)
    work.steps += steps
    work.notes += notes


def propose_position_map(work: Proposal) -> None:
    """What is still unmatched on both sides, paired by position (``--map``), when the shapes line up."""
    current, tgt = work.current, work.tgt
    unexpected, absent = work.unexpected(), work.absent()
    if not unexpected or not absent:
        return
    lost = _order_lost(work)
    if lost:
        # same-shape tensors (q, k, v, o) would pair by alphabet, not by the model's order
        work.notes.append(
            f"{len(unexpected)} checkpoint keys and {len(absent)} target keys are unmatched; {lost}, so "
            f"they are not paired by position: pair them by hand (--rename or --map) if they are the same tensors"
        )
        return
    alignment = align([(k, current[k]) for k in unexpected], [(k, tgt[k]) for k in absent])
    if alignment is None:
        return
    work.alignment = alignment
    n = len(alignment.pairs)
    reason = (
        f"{n} unmatched keys pair up by {alignment.method} in state-dict order, same shapes"
        f"{', same leaf names' if all(p.same_leaf for p in alignment.pairs) else ''} (confidence "
        f"{alignment.confidence:.2f}): " + some(f"{p.source} -> {p.target}" for p in alignment.pairs)
    )
    left = len(alignment.unaligned_source) + len(alignment.unaligned_target)
    if left:
        reason += f"; {left} keys do not align ({some([*alignment.unaligned_source, *alignment.unaligned_target])})"
        work.notes.append(
            f"{len(alignment.unaligned_source)} checkpoint keys and {len(alignment.unaligned_target)} "
            f"target keys did not align by position; pair them by hand in {work.map_file} if they "
            "are the same tensors"
        )
    mapping = alignment.mapping
    work.add(
        {"op": "map", "mapping": mapping, "file": work.map_file},
        reason,
        n,
        {mapping.get(k, k): s for k, s in current.items()},
    )


def _order_lost(work: Proposal) -> str:
    """Why a side's key order is not its model's (safetensors headers and shard indexes sort keys), or ``""``."""
    if work.source.format in (fmt.SAFETENSORS, fmt.SHARDED):
        return f"the checkpoint's key order is not the model's ({work.source.format} files sort their keys)"
    if work.arch is None and work.target.spec.endswith((".safetensors", ".json")):
        return "the target checkpoint's key order is not the model's (safetensors files sort their keys)"
    return ""


def _placeable(work: Proposal) -> dict[str, list[str]]:
    """Unexpected key -> the absent target keys of its shape that it ends, or that end with it.

    ``module.stat`` could be ``stat``: a drop must not throw it away (AveragedModel's ``module.*``).
    Linear in the keys: only the dotted endings of each key are looked up.
    """
    absent = {k: work.tgt[k] for k in work.absent()}
    by_ending: dict[str, list[str]] = {}
    for t in absent:
        parts = t.split(".")
        for i in range(1, len(parts)):
            by_ending.setdefault(".".join(parts[i:]), []).append(t)
    out: dict[str, list[str]] = {}
    for k in work.unexpected():
        parts = k.split(".")
        found = [".".join(parts[i:]) for i in range(1, len(parts))] + by_ending.get(k, [])
        hits = [t for t in dict.fromkeys(found) if t in absent and absent[t] == work.current[k]]
        if hits:
            out[k] = hits
    return out


def propose_placements(work: Proposal) -> None:
    """Rename a key that is, by its name's ending and its shape, the one absent target key that could be it."""
    placeable = _placeable(work)
    wanted: dict[str, list[str]] = {}
    for k, hits in placeable.items():
        for t in hits:
            wanted.setdefault(t, []).append(k)
    pairs = [(k, hits[0]) for k, hits in placeable.items() if len(hits) == 1 and len(wanted[hits[0]]) == 1]
    if not pairs:
        return
    rules = [("^" + re.escape(k) + "$", t) for k, t in pairs]
    for (pattern, replacement), (k, t) in zip(rules, pairs):
        work.add(
            {"op": "rename", "pattern": pattern, "replacement": replacement},
            f"{k} {list(work.current[k])} is the only key that could be the target's {t}, which it lacks: "
            "same name ending, same shape",
            1,
        )
    work.current = _apply_renames(work.current, rules)


def propose_drops(work: Proposal) -> None:
    unexpected = work.unexpected()
    if not unexpected:
        return
    # what a rename could still place is never dropped: it is left unmatched, with a note
    kept = _placeable(work)
    for k, hits in kept.items():
        work.notes.append(
            f"{k} {list(work.current[k])} is not dropped: it could be {' or '.join(hits)} (same name ending "
            "and shape); rename it (--rename or --map) to the one it is"
        )
    droppable = [k for k in unexpected if k not in kept]
    if not droppable:
        return
    prefixes = _drop_prefixes(droppable, work.current)
    if kept or len(prefixes) <= MAX_DROP_PREFIXES:
        for p in prefixes:
            n = sum(1 for k in droppable if in_module(k, p))
            work.add(
                {"op": "drop", "prefix": p}, f"the target has no {p} ({n} key{'s' * (n != 1)} the checkpoint has)", n
            )
    else:
        work.add(
            {"op": "drop_unexpected"}, f"{len(unexpected)} checkpoint keys have no place in the target", len(unexpected)
        )
    work.current = {k: s for k, s in work.current.items() if k in work.target.tensors or k in kept}


def propose_fills(work: Proposal) -> None:
    tgt, current = work.tgt, work.current
    _, missing, mismatched = _placed(work)
    if missing:
        if work.arch is not None:
            work.add(
                {"op": "fill_missing"},
                f"{len(missing)} target keys the checkpoint lacks keep the target's initialisation ({some(missing)})",
                len(missing),
            )
        else:
            work.notes.append(
                f"{len(missing)} target keys are not in the checkpoint ({some(missing)}); with a "
                "checkpoint as the target there is no initialisation to fill them from (use --arch)"
            )
    if mismatched:
        if work.arch is not None:
            work.add(
                {"op": "reinit_mismatched"},
                "shapes differ for "
                + some([f"{k} {list(current[k])} -> {list(tgt[k])}" for k in mismatched])
                + ": re-initialise them",
                len(mismatched),
            )
        else:
            work.notes.append(
                f"{len(mismatched)} keys differ in shape ({some(mismatched)}); only --arch can re-initialise them"
            )


PROPOSERS: list[Proposer] = [
    propose_prefixes,
    propose_leaf_renames,
    propose_module_renames,
    propose_adaptations,
    propose_position_map,
    propose_placements,
    propose_drops,
    propose_fills,
]


_PREFIX_ORIGINS = {
    "module.": " (saved from nn.DataParallel / DistributedDataParallel)",
    "_orig_mod.": " (saved from a torch.compile'd model)",
}


def _prefix_origin(prefix: str) -> str:
    return _PREFIX_ORIGINS.get(prefix, "")


def _dotted_prefixes(prefix: str) -> list[str]:
    """``"a.b."`` -> ``["a.", "a.b."]``."""
    parts = prefix.split(".")[:-1]
    return [".".join(parts[: i + 1]) + "." for i in range(len(parts))]


# a prefix held by more than this share of one side's keys is tried even when a few keys lack it: a
# classifier head beside ``bert.*``, AveragedModel's ``n_averaged`` beside ``module.*``
PREFIX_SHARE = 0.5
PREFIX_DEPTH = 2  # leading components tried (``module.``, ``model.backbone.``); a common prefix may be deeper


def _frequent_prefixes(keys: list[str]) -> list[str]:
    """The prefixes of up to :data:`PREFIX_DEPTH` leading components that over half of the keys have.

    At most one prefix per depth can hold over half of the keys, and a deeper one lies under it, so
    there are at most :data:`PREFIX_DEPTH` of them, found in linear work.
    """
    frequent: list[str] = []
    under = keys
    for _ in range(PREFIX_DEPTH):
        top = Counter([k.partition(".")[0] for k in under if "." in k]).most_common(1)
        if not top or top[0][1] <= PREFIX_SHARE * len(keys):
            break
        head = top[0][0] + "."
        frequent.append((frequent[-1] if frequent else "") + head)
        under = [k[len(head) :] for k in under if k.startswith(head)]
    return frequent


def _best_prefixes(src: list[str], tgt: dict[str, Any]) -> tuple[str, str]:
    """The (strip, add) pair of prefixes most keys of one side have that matches the most keys; ``("", "")`` if none.

    The prefixes every key of a side shares are tried first; those most keys have (a wrapped model
    beside a head or a counter) only when they leave keys unmatched. ``strip`` leaves the keys
    without it as they are (as ``--strip-prefix`` does), and then comes with no ``add``; a pair
    that would give two keys one name is never chosen.
    """
    best_score, best = sum(1 for k in src if k in tgt), ("", "")
    everything = min(len(src), len(tgt))
    tried: set[tuple[str, str]] = set()
    strips, adds = ["", *_dotted_prefixes(common_prefix(src))], ["", *_dotted_prefixes(common_prefix(list(tgt)))]
    for stage in (0, 1):
        if best_score == everything:
            break
        if stage:
            strips += _frequent_prefixes(src)
            adds += _frequent_prefixes(list(tgt))
        for strip in dict.fromkeys(strips):
            held = sum(1 for k in src if k.startswith(strip)) if strip else len(src)
            rest = [k[len(strip) :] if k.startswith(strip) else k for k in src] if strip else src
            # a strip some keys escape, then an add that reaches them too, is a rename in disguise
            for add in dict.fromkeys(adds if held == len(src) else [""]):
                if (strip, add) in tried or not (strip or add) or strip == add:
                    continue
                tried.add((strip, add))
                score = sum(1 for k in rest if add + k in tgt)
                if score > best_score and (held == len(src) or len(set(rest)) == len(rest)):
                    best_score, best = score, (strip, add)
    return best


def _apply_prefixes(shapes: dict[str, tuple[int, ...]], strip: str, add: str) -> dict[str, tuple[int, ...]]:
    if not strip and not add:
        return shapes
    return {add + (k[len(strip) :] if strip and k.startswith(strip) else k): s for k, s in shapes.items()}


def _module_keys(keys: dict[str, tuple[int, ...]], module: str) -> list[str]:
    """Keys directly under ``module`` (its own parameters and buffers, not its children's)."""
    return [k for k in keys if k.rpartition(".")[0] == module]


def _renames(
    current: dict[str, tuple[int, ...]], tgt: dict[str, tuple[int, ...]]
) -> tuple[list[tuple[str, str, list[tuple[str, str]]]], list[str]]:
    """Rename rules for modules present on one side only whose (leaf name, shape) sets match one to one.

    Modules with the same signature pair up by name (:func:`_pair_by_name`), never by their order:
    a safetensors file lists its keys alphabetically, so order would pair ``q`` with ``k``. What
    names cannot pair is left to the user, with a note.
    """

    def unmatched_modules(keys: dict[str, tuple[int, ...]], other: dict[str, Any]) -> dict[str, tuple[Any, ...]]:
        modules: dict[str, list[tuple[str, tuple[int, ...]]]] = {}
        complete: dict[str, bool] = {}
        for k, shape in keys.items():
            module, _, leaf = k.rpartition(".")
            modules.setdefault(module, []).append((leaf, shape))
            complete[module] = complete.get(module, True) and k not in other
        return {m: tuple(sorted(sig)) for m, sig in modules.items() if complete[m] and m}

    old = unmatched_modules(current, tgt)
    new = unmatched_modules(tgt, current)
    by_sig_old: dict[tuple[Any, ...], list[str]] = {}
    by_sig_new: dict[tuple[Any, ...], list[str]] = {}
    for m, sig in old.items():
        by_sig_old.setdefault(sig, []).append(m)
    for m, sig in new.items():
        by_sig_new.setdefault(sig, []).append(m)
    pairs: list[tuple[str, str]] = []
    notes = []
    for sig, olds in by_sig_old.items():
        news = by_sig_new.get(sig, [])
        if not news:
            continue
        paired = _pair_by_name(olds, news)
        pairs.extend(paired)
        left_old = [o for o in olds if o not in {a for a, _ in paired}]
        left_new = [n for n in news if n not in {b for _, b in paired}]
        if left_old and left_new:
            notes.append(
                f"{some(left_old)} and {some(left_new)} have the same keys and shapes but no one-to-one "
                "pairing by name (the order of a file's keys says nothing about the model's): rename "
                "them by hand (--rename or --map) if they are the same layers"
            )
    return _rename_rules(pairs, current), notes


def _pair_by_name(olds: list[str], news: list[str]) -> list[tuple[str, str]]:
    """Pairs of modules of one signature whose names agree: each is the other's only longest common ending.

    ``backbone.k`` pairs with ``k`` (one component in common) and not with ``q``; ``blocks.1`` with
    ``layers.1``. A module alone in its signature on both sides pairs whatever its name (a head
    renamed ``fc`` -> ``classifier``): nothing else could be it. Two candidates tied for one
    module pair neither.
    """
    if len(olds) == 1 and len(news) == 1:
        return [(olds[0], news[0])]

    def ending(a: str, b: str) -> int:
        x, y = a.split("."), b.split(".")
        n = 0
        while n < min(len(x), len(y)) and x[-1 - n] == y[-1 - n]:
            n += 1
        return n

    def best(mine: list[str], theirs: list[str]) -> dict[str, str]:
        out = {}
        for m in mine:
            scores = [(ending(m, t), t) for t in theirs]
            top = max(n for n, _ in scores)
            winners = [t for n, t in scores if n == top]
            if top > 0 and len(winners) == 1:
                out[m] = winners[0]
        return out

    forward, backward = best(olds, news), best(news, olds)
    return [(o, n) for o, n in forward.items() if backward.get(n) == o]


def _rename_rules(
    pairs: list[tuple[str, str]], current: dict[str, tuple[int, ...]]
) -> list[tuple[str, str, list[tuple[str, str]]]]:
    """Regex rules for module renames: one per pair, or one per numbered family (``blocks.N.x`` -> ``layers.N.y``).

    A rule is kept only if, applied to every key, it renames exactly the keys of its pairs.
    """
    families: dict[tuple[tuple[str, ...], tuple[str, ...]], list[tuple[str, str]]] = {}
    singles: list[tuple[str, str]] = []
    for old, new in pairs:
        o, n = old.split("."), new.split(".")
        if [p for p in o if is_index(p)] == [p for p in n if is_index(p)] and any(is_index(p) for p in o):
            families.setdefault(
                (tuple("#" if is_index(p) else p for p in o), tuple("#" if is_index(p) else p for p in n)), []
            ).append((old, new))
        else:
            singles.append((old, new))
    rules: list[tuple[str, str, list[tuple[str, str]]]] = []
    for (o_tpl, n_tpl), members in families.items():
        if len(members) < 2:
            singles.extend(members)
            continue
        pattern = "^" + r"\.".join(r"(\d+)" if p == "#" else re.escape(p) for p in o_tpl) + r"\."
        groups = iter(range(1, len(o_tpl) + 1))
        replacement = ".".join(f"\\{next(groups)}" if p == "#" else p for p in n_tpl) + "."
        if _rule_is_exact(pattern, replacement, members, current):
            rules.append((pattern, replacement, members))
        else:
            singles.extend(members)
    for old, new in singles:
        pattern, replacement = "^" + re.escape(old) + r"\.", new + "."
        if not _rule_is_exact(pattern, replacement, [(old, new)], current):
            # the module has children of its own: rename only its direct parameters and buffers
            pattern, replacement = "^" + re.escape(old) + r"\.([^.]+)$", new + r".\1"
        rules.append((pattern, replacement, [(old, new)]))
    order = {old: i for i, (old, _) in enumerate(pairs)}
    return sorted(rules, key=lambda r: min(order[o] for o, _ in r[2]))


def _rule_is_exact(
    pattern: str, replacement: str, members: list[tuple[str, str]], current: dict[str, tuple[int, ...]]
) -> bool:
    wanted = {k: new + k[len(old) :] for old, new in members for k in _module_keys(current, old)}
    rx = re.compile(pattern)
    for k in current:
        renamed = rx.sub(replacement, k, count=1)
        if renamed != wanted.get(k, k):
            return False
    return True


def _apply_renames(current: dict[str, tuple[int, ...]], rules: list[tuple[str, str]]) -> dict[str, tuple[int, ...]]:
    for pattern, replacement in rules:
        rx = re.compile(pattern)
        current = {rx.sub(replacement, k, count=1): s for k, s in current.items()}
    return current


def _rename_reason(pairs: list[tuple[str, str]]) -> str:
    shown = some(f"{o} -> {n}" for o, n in pairs)
    return f"same parameter names and shapes under another module name: {shown}"


def _drop_prefixes(unexpected: list[str], current: dict[str, tuple[int, ...]]) -> list[str]:
    """The shortest module paths that hold only unexpected keys and, together, all of them."""
    bad = set(unexpected)
    out: list[str] = []
    for k in unexpected:
        if any(in_module(k, p) for p in out):
            continue
        parts = k.split(".")
        for i in range(1, len(parts) + 1):
            p = ".".join(parts[:i])
            if all(other in bad for other in current if in_module(other, p)):
                out.append(p)
                break
    return out
