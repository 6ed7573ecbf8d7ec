"""The fix plan: ``ckpt migrate`` operations that make a checkpoint load strictly, with a reason for each."""

from __future__ import annotations

import re
from typing import Any

from ..arch import TargetSignature
from ..compat import MOSTLY_NEW_SHARE, parameter_share, shapes_load
from ..model import Checkpoint, common_prefix, in_module
from ..plan import Plan
from ..plan import operation as plan_operation
from ..text import some
from .adapt import adaptation_steps
from .report import FixPlan, PlanStep
from .rows import is_index

# more drop prefixes than this and the plan says --drop-unexpected instead
MAX_DROP_PREFIXES = 4


def suggest_plan(source: Checkpoint, target: TargetSignature, *, arch: str | None,
                 arch_args: dict[str, Any], optional: set[str] | frozenset[str] = frozenset()) -> FixPlan:
    """The ``ckpt migrate`` operations that make ``source`` load strictly into ``target``, with reasons.

    Prefixes first (``module.``, ``_orig_mod.``, ``backbone.``...), then renames of whole modules whose
    keys and shapes match one to one in order, then drops, then (with an architecture to take values
    from) ``fill_missing`` and ``reinit_mismatched``. ``optional`` target keys may stay absent (torch fills them);
    so may a tied key whose partner loads. When under half of an architecture's parameters would come from the
    checkpoint, no command is proposed (``mostly_new``): the checkpoint is likely not of this architecture.
    """
    shapes = {k: t.shape for k, t in source.tensors.items()}
    tgt = {k: t.shape for k, t in target.tensors.items()}
    partners = target.partners()
    steps: list[PlanStep] = []
    notes: list[str] = []

    strip, add = _best_prefixes(list(shapes), tgt)
    if strip:
        steps.append(PlanStep({"op": "strip_prefix", "prefix": strip},
                              f"every checkpoint key starts with {strip!r}{_prefix_origin(strip)}", len(shapes)))
    if add:
        steps.append(PlanStep({"op": "add_prefix", "prefix": add}, f"every target key starts with {add!r}", len(shapes)))
    current = _apply_prefixes(shapes, strip, add)

    renames, rename_notes = _renames(current, tgt)
    notes += rename_notes
    for pattern, replacement, pairs in renames:
        steps.append(PlanStep({"op": "rename", "pattern": pattern, "replacement": replacement},
                              _rename_reason(pairs, current), sum(len(_module_keys(current, o)) for o, _ in pairs)))
    current = _apply_renames(current, [(p, r) for p, r, _ in renames])
    adapt_steps, current, adapt_notes = adaptation_steps(current, target, arch)
    steps += adapt_steps
    notes += adapt_notes

    unexpected = [k for k in current if k not in tgt]
    if unexpected:
        prefixes = _drop_prefixes(unexpected, current)
        if len(prefixes) <= MAX_DROP_PREFIXES:
            for p in prefixes:
                n = sum(1 for k in unexpected if in_module(k, p))
                steps.append(PlanStep({"op": "drop", "prefix": p},
                                      f"the target has no {p} ({n} key{'s' * (n != 1)} the checkpoint has)", n))
        else:
            steps.append(PlanStep({"op": "drop_unexpected"},
                                  f"{len(unexpected)} checkpoint keys have no place in the target", len(unexpected)))
    mismatched = [k for k in tgt if k in current and not shapes_load(current[k], tgt[k])]
    loaded = {k for k in tgt if k in current and shapes_load(current[k], tgt[k])}
    missing = [k for k in tgt if k not in current and k not in optional
               and not any(p in loaded for p in partners.get(k, ()))]
    if missing:
        if arch is not None:
            steps.append(PlanStep({"op": "fill_missing"}, f"{len(missing)} target keys the checkpoint lacks keep the "
                                  f"target's initialisation ({some(missing)})", len(missing)))
        else:
            notes.append(f"{len(missing)} target keys are not in the checkpoint ({some(missing)}); with a checkpoint "
                         "as the target there is no initialisation to fill them from (use --arch)")
    if mismatched:
        if arch is not None:
            steps.append(PlanStep({"op": "reinit_mismatched"}, "shapes differ for " + some(
                [f"{k} {list(current[k])} -> {list(tgt[k])}" for k in mismatched]) + ": re-initialise them", len(mismatched)))
        else:
            notes.append(f"{len(mismatched)} keys differ in shape ({some(mismatched)}); only --arch can re-initialise them")
    # drops cover every unexpected key; what is missing or mismatched needs a model to take values from
    resolves = arch is not None or not (missing or mismatched)
    operations = [s.operation for s in steps]
    plan = Plan(source.path, source.state_path or None, arch, dict(arch_args),
                tuple(plan_operation(op["op"], **{k: v for k, v in op.items() if k != "op"}) for op in operations))
    share = parameter_share(target, loaded) if arch is not None else 1.0
    mostly_new = share < MOSTLY_NEW_SHARE
    command = plan.command() if operations and not mostly_new else None
    return FixPlan(tuple(steps), plan.to_json(), command, resolves, tuple(notes), plan, round(share, 6), mostly_new)


_PREFIX_ORIGINS = {"module.": " (saved from nn.DataParallel / DistributedDataParallel)",
                   "_orig_mod.": " (saved from a torch.compile'd model)"}


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
                score = sum(1 for k in src if add + k[len(strip):] in tgt)
                if score > best_score:
                    best_score, best = score, (strip, add)
    return best


def _apply_prefixes(shapes: dict[str, tuple[int, ...]], strip: str, add: str) -> dict[str, tuple[int, ...]]:
    return {add + k[len(strip):]: s for k, s in shapes.items()}


def _module_keys(keys: dict[str, tuple[int, ...]], module: str) -> list[str]:
    """Keys directly under ``module`` (its own parameters and buffers, not its children's)."""
    return [k for k in keys if k.rpartition(".")[0] == module]


def _renames(current: dict[str, tuple[int, ...]], tgt: dict[str, tuple[int, ...]]) -> tuple[
        list[tuple[str, str, list[tuple[str, str]]]], list[str]]:
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
            notes.append(f"{', '.join(olds)} and {', '.join(news)} have the same keys and shapes but no one-to-one "
                         "pairing: rename them by hand (--rename or --map) if they are the same layers")
    return _rename_rules(pairs, current), notes


def _rename_rules(pairs: list[tuple[str, str]], current: dict[str, tuple[int, ...]]) -> list[
        tuple[str, str, list[tuple[str, str]]]]:
    """Regex rules for module renames: one per pair, or one per numbered family (``blocks.N.x`` -> ``layers.N.y``).

    A rule is kept only if, applied to every key, it renames exactly the keys of its pairs.
    """
    families: dict[tuple[tuple[str, ...], tuple[str, ...]], list[tuple[str, str]]] = {}
    singles: list[tuple[str, str]] = []
    for old, new in pairs:
        o, n = old.split("."), new.split(".")
        if [p for p in o if is_index(p)] == [p for p in n if is_index(p)] and any(is_index(p) for p in o):
            families.setdefault((tuple("#" if is_index(p) else p for p in o),
                                 tuple("#" if is_index(p) else p for p in n)), []).append((old, new))
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


def _rule_is_exact(pattern: str, replacement: str, members: list[tuple[str, str]],
                   current: dict[str, tuple[int, ...]]) -> bool:
    wanted = {k: new + k[len(old):] for old, new in members for k in _module_keys(current, old)}
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


def _rename_reason(pairs: list[tuple[str, str]], current: dict[str, tuple[int, ...]]) -> str:
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
