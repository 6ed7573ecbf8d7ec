"""The fix plan: ``ckpt migrate`` operations that make a checkpoint load strictly, with a reason for each.

The plan grows through :data:`PROPOSERS`, in order: each reads what is still unmatched in a
:class:`Proposal` and adds steps (prefixes, leaf renames, module renames, a map by position, drops,
fills). A new kind of fix is one more proposer in that list.
"""

from __future__ import annotations

import functools
import os
import re
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

from ..arch import TargetSignature
from ..compat import MOSTLY_NEW_SHARE, parameter_share, shapes_load
from ..model import Checkpoint, common_prefix, in_module
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
    for propose in PROPOSERS:
        if work.settled():  # the usual diff of two copies of one model: every proposer would find nothing
            break
        propose(work)
    return _finish(work, arch_args)


def _finish(work: Proposal, arch_args: dict[str, Any]) -> FixPlan:
    tgt, current, partners = work.tgt, work.current, work.target.partners()
    loaded = {k for k in tgt if k in current and shapes_load(current[k], tgt[k])}
    missing = [
        k
        for k in tgt
        if k not in current and k not in work.optional and not any(p in loaded for p in partners.get(k, ()))
    ]
    mismatched = [k for k in tgt if k in current and not shapes_load(current[k], tgt[k])]
    # drops cover every unexpected key; what is missing or mismatched needs a model to take values from
    resolves = work.arch is not None or not (missing or mismatched)
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
    command = plan.command() if operations and not mostly_new else None
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
        work.add(
            {"op": "strip_prefix", "prefix": strip},
            f"every checkpoint key starts with {strip!r}{_prefix_origin(strip)}",
            n,
        )
    if add:
        work.add({"op": "add_prefix", "prefix": add}, f"every target key starts with {add!r}", n)
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
    if len(renames) > MAX_RENAME_RULES and _position_map_agrees(work, renames):
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
    alignment = align([(k, current[k]) for k in work.unexpected()], [(k, tgt[k]) for k in work.absent()])
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


def propose_drops(work: Proposal) -> None:
    unexpected = work.unexpected()
    if not unexpected:
        return
    prefixes = _drop_prefixes(unexpected, work.current)
    if len(prefixes) <= MAX_DROP_PREFIXES:
        for p in prefixes:
            n = sum(1 for k in unexpected if in_module(k, p))
            work.add(
                {"op": "drop", "prefix": p}, f"the target has no {p} ({n} key{'s' * (n != 1)} the checkpoint has)", n
            )
    else:
        work.add(
            {"op": "drop_unexpected"}, f"{len(unexpected)} checkpoint keys have no place in the target", len(unexpected)
        )
    work.current = {k: s for k, s in work.current.items() if k in work.target.tensors}


def propose_fills(work: Proposal) -> None:
    tgt, current, partners = work.tgt, work.current, work.target.partners()
    loaded = {k for k in tgt if k in current and shapes_load(current[k], tgt[k])}
    missing = [
        k
        for k in tgt
        if k not in current and k not in work.optional and not any(p in loaded for p in partners.get(k, ()))
    ]
    mismatched = [k for k in tgt if k in current and not shapes_load(current[k], tgt[k])]
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


def _best_prefixes(src: list[str], tgt: dict[str, Any]) -> tuple[str, str]:
    """The (strip, add) pair of prefixes common to one side that matches the most keys; ``("", "")`` if none helps."""
    best_score, best = sum(1 for k in src if k in tgt), ("", "")
    for strip in [""] + _dotted_prefixes(common_prefix(src)):
        for add in [""] + _dotted_prefixes(common_prefix(list(tgt))):
            if strip or add:
                score = sum(1 for k in src if add + k[len(strip) :] in tgt)
                if score > best_score:
                    best_score, best = score, (strip, add)
    return best


def _apply_prefixes(shapes: dict[str, tuple[int, ...]], strip: str, add: str) -> dict[str, tuple[int, ...]]:
    return {add + k[len(strip) :]: s for k, s in shapes.items()}


def _module_keys(keys: dict[str, tuple[int, ...]], module: str) -> list[str]:
    """Keys directly under ``module`` (its own parameters and buffers, not its children's)."""
    return [k for k in keys if k.rpartition(".")[0] == module]


def _renames(
    current: dict[str, tuple[int, ...]], tgt: dict[str, tuple[int, ...]]
) -> tuple[list[tuple[str, str, list[tuple[str, str]]]], list[str]]:
    """Rename rules for modules present on one side only whose (leaf name, shape) sets match one to one.

    Modules with the same signature pair up in order when both sides have as many; otherwise the
    pairing is ambiguous and only a note says so.
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
        if len(olds) == len(news):
            pairs.extend(zip(olds, news))
        else:
            notes.append(
                f"{', '.join(olds)} and {', '.join(news)} have the same keys and shapes but no one-to-one "
                "pairing: rename them by hand (--rename or --map) if they are the same layers"
            )
    return _rename_rules(pairs, current), notes


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
