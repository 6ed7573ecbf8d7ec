"""Carrying training state through a plan: optimizer states re-keyed, ``--also-key`` state dicts, the rest
as it is; and the re-read of all of it after the write."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from ..arch import TargetSignature
from ..checkpoint import Checkpoint, TensorRef
from ..errors import UsageError
from ..formats.pickle_vm import PickledTensor, Placeholder
from ..plan import CHECKPOINT, Entry, Operation, Plan, State, Step, apply, initial_state
from ..reader import module_metadata, resolve_key, sibling_entries, state_objects, tensor_ref, to_state_dict
from ..writer import PTH, StateDictValue, TensorSlot
from .ids import OptimizerState, ParamState, find_optimizers, map_ids, parameter_order

CARRIED = "@"  # planned entries under keys starting with this live outside the state dict


# --- carrying -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class OptimizerPlan:
    """What happens to one optimizer state: shown in the plan before writing."""

    path: str
    kind: str
    mapped_by: str
    groups: tuple[int, ...]  # parameters per group, after the plan
    carried: tuple[tuple[str, str], ...]  # (source parameter, output parameter) whose state follows it
    dropped: tuple[str, ...]  # source parameters whose state is removed with them
    fresh: tuple[str, ...]  # output parameters without state (filled, re-initialised, or none before)
    cast: tuple[str, ...] = ()  # output parameters whose moments are cast with them


@dataclass(frozen=True)
class AlsoPlan:
    """A sibling state dict (``--also-key state_dict_ema``) given the same operations."""

    key: str
    tensors: int
    steps: tuple[Step, ...]


@dataclass
class Carried:
    """The training state to write beside the state dict: trees with tensor slots, the entries the
    slots name, and what was dropped (name -> why)."""

    extras: dict[str, Any] = field(default_factory=dict)
    state: State = field(default_factory=dict)
    dropped: dict[str, str] = field(default_factory=dict)
    optimizers: tuple[OptimizerPlan, ...] = ()
    also: tuple[AlsoPlan, ...] = ()
    file: str = ""  # the source, which the tensors' references read
    drop_paths: frozenset[str] = frozenset()  # optimizer states left out (--drop-optimizer)


def training_state(
    ckpt: Checkpoint, plan: Plan, final: State, target: TargetSignature | None, fmt: str, *, sharded: bool = False
) -> Carried | None:
    """The training state ``plan`` carries beside ``final`` (its planned state dict), or ``None`` when
    there is none to carry (no optimizer state and no ``--also-key``) or the output has no place for
    it (then migrate drops it, listed, as any entry that is not plain data)."""
    optimizers = find_optimizers(ckpt)
    if not optimizers and not plan.also_keys:
        return None
    if fmt != PTH or sharded:
        if plan.also_keys:
            raise UsageError(
                f"--also-key {plan.also_keys[0]}: only a single .pth output holds a second state dict "
                "(write one .pth, without --max-shard-size)"
            )
        return None
    if plan.drop_optimizer and not plan.also_keys:
        return None
    from ..arch import target_signature

    source = target_signature(plan.source_arch, {}) if plan.source_arch else None
    return carry(
        ckpt,
        plan.operations,
        final,
        target=target,
        source=source,
        also_keys=plan.also_keys,
        optimizers=() if plan.drop_optimizer else optimizers,
        drop=tuple(o.path for o in optimizers) if plan.drop_optimizer else (),
    )


def carry(
    ckpt: Checkpoint,
    operations: Sequence[Operation],
    final: State,
    *,
    target: TargetSignature | None,
    source: TargetSignature | None = None,
    also_keys: Sequence[str] = (),
    optimizers: Sequence[OptimizerState] = (),
    drop: Sequence[str] = (),
) -> Carried:
    """Every entry beside the state dict, carried: optimizer states re-keyed for ``final``, ``also_keys``
    state dicts given ``operations``, the rest (schedulers, scalers, counters, callbacks) as it is.

    Entries holding objects (a pickled class instance) cannot go into a ``weights_only`` file: they
    are dropped and named. Raises :class:`MappingError` when an optimizer's ids cannot be mapped.
    """
    out = Carried(file=ckpt.path, drop_paths=frozenset(drop))
    by_path = {o.path: map_ids(o, ckpt, operations, final, source=source, target=target) for o in optimizers}
    out.optimizers = tuple(_plan_of(o, final, target) for o in by_path.values())
    also = {}
    for key in also_keys:
        walked, entries, steps, meta = _also_state(ckpt, key, operations, target)
        also[walked] = (entries, meta)
        out.also += (AlsoPlan(walked, len(entries), steps),)
    for name, value in sibling_entries(ckpt.root, ckpt.state_path):
        try:
            out.extras[name] = _tree(value, name, out, by_path, also, final, target)
        except _NotCarried as exc:
            out.dropped[name] = str(exc)
    missing = [k for k in also if not any(k == n or k.startswith(n + "/") for n in out.extras)]
    if missing:
        raise UsageError(f"{ckpt.path}: --also-key {missing[0]} is not beside the state dict {ckpt.state_path!r}")
    return out


class _NotCarried(Exception):
    pass


def _tree(
    value: Any,
    path: str,
    out: Carried,
    opts: Mapping[str, OptimizerState],
    also: Mapping[str, tuple[State, dict[str, Any] | None]],
    final: State,
    target: TargetSignature | None,
) -> Any:
    """``value`` as the writer writes it: plain data, tensors as slots; optimizer states re-keyed."""
    if path in out.drop_paths:
        raise _NotCarried("optimizer state (--drop-optimizer)")
    if path in opts:
        return _tree(_rekeyed(opts[path], final, target), path, out, {}, {}, final, target)
    if path in also:
        entries, meta = also[path]
        for k, e in entries.items():
            out.state[_slot_key(path, k)] = replace(e, key=_slot_key(path, k))
        return StateDictValue(
            {k: TensorSlot(_slot_key(path, k)) for k in entries}, {"_metadata": meta} if meta is not None else None
        )
    if isinstance(value, TensorSlot):
        return value
    if isinstance(value, PickledTensor):
        key = _slot_key(path, "")
        out.state[key] = Entry.from_ref(tensor_ref(key, value, out.file))
        return TensorSlot(key)
    if isinstance(value, Entry):  # a re-keyed optimizer tensor (carried, perhaps cast)
        key = _slot_key(path, "")
        out.state[key] = replace(value, key=key)
        return TensorSlot(key)
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, (list, tuple)):
        items = [_tree(v, f"{path}/{i}", out, opts, also, final, target) for i, v in enumerate(value)]
        return tuple(items) if isinstance(value, tuple) else items
    if isinstance(value, dict) and all(isinstance(k, (str, int)) for k in value):
        return {k: _tree(v, f"{path}/{k}", out, opts, also, final, target) for k, v in value.items()}
    if isinstance(value, Placeholder):
        raise _NotCarried(f"an object ({value.name}): a torch.load(weights_only=True) file cannot hold it")
    raise _NotCarried(f"{type(value).__name__}: not plain data or tensors")


def _slot_key(path: str, key: str) -> str:
    return f"{CARRIED}{path}/{key}" if key else f"{CARRIED}{path}"


def _new_order(opt: OptimizerState, final: State, target: TargetSignature | None) -> list[str]:
    """The output's parameters in ``model.parameters()`` order."""
    if target is not None:
        return [k for k in parameter_order(target) if k in final]
    params = set(opt.name_of().values())
    return [k for k, e in final.items() if e.from_checkpoint and not e.tied_to and e.origin in params]


def _assign(
    opt: OptimizerState, final: State, target: TargetSignature | None
) -> tuple[list[list[str]], dict[str, int | str]]:
    """Output parameters per group (model order within a group), and each kept one's old id.

    A kept parameter stays in its group, a re-initialised one takes the group of the one it replaces,
    an added one joins the group of the parameter before it (the first group's, if none). A parameter
    whose values the plan computes (an adapted input conv, a resampled position embedding, a grown
    block's copy) keeps its source's group but starts without state, as a new parameter does: its
    moments belong to other values, and often to another shape.
    """
    old_id = {name: i for i, name in opt.name_of().items()}
    if opt.regroup:
        # the groups are the trainer's for the output model; a kept parameter's state follows it there
        kept_ids: dict[str, int | str] = {}
        for key in (k for g in opt.regroup for k in g):
            e = final[key]
            if e.from_checkpoint and not e.tied_to and not e.transform and e.origin in old_id:
                kept_ids[key] = old_id[e.origin]
        return [list(g) for g in opt.regroup], kept_ids
    group_of = {i: g for g, group in enumerate(opt.groups) for i in group.params}
    groups: list[list[str]] = [[] for _ in opt.groups]
    kept: dict[str, int | str] = {}
    last = 0
    for key in _new_order(opt, final, target):
        e = final[key]
        origin = e.origin if e.from_checkpoint and not e.tied_to else e.replaces
        if origin in old_id:
            last = group_of[old_id[origin]]
            if e.from_checkpoint and not e.transform:
                kept[key] = old_id[origin]
        if groups:
            groups[last].append(key)
    return groups, kept


def _rekeyed(opt: OptimizerState, final: State, target: TargetSignature | None) -> dict[str, Any]:
    """The optimizer state for the output model: ``{"state": ..., "param_groups": ...}`` with entries for tensors."""
    groups, kept = _assign(opt, final, target)
    by_id = {s.id: s for s in opt.state}
    src = opt.raw
    new_groups = []
    new_state: dict[int | str, Any] = {}
    next_id = 0
    for group, keys in zip(opt.groups, groups):
        ids: list[int | str] = []
        for key in keys:
            new_id: int | str = key if opt.fqn else next_id
            next_id += 1
            ids.append(new_id)
            s = by_id.get(kept[key]) if key in kept else None
            if s is not None:
                new_state[new_id] = _param_state(s, final[key], src["state"][s.id])
        hyper = {k: v for k, v in group.hyper}
        if "param_names" in hyper:
            hyper["param_names"] = list(keys)
        new_groups.append({**hyper, "params": ids})
    position = {i: n for n, i in enumerate(i for g in new_groups for i in g["params"])}
    ordered = dict(sorted(new_state.items(), key=lambda kv: position[kv[0]]))
    return {
        **{k: v for k, v in src.items() if k not in ("state", "param_groups")},
        "state": ordered,
        "param_groups": new_groups,
    }


def _param_state(s: ParamState, param: Entry, raw: dict[Any, Any]) -> dict[str, Any]:
    """One parameter's state, its moments cast when the parameter is (``step`` never is)."""
    tensors = dict(s.tensors)
    out: dict[str, Any] = {}
    for name, value in raw.items():
        ref = tensors.get(str(name))
        if ref is None:
            out[name] = value
            continue
        e = Entry.from_ref(ref)
        if param.dtype != param.source_dtype and ref.dtype == param.source_dtype and ref.shape == param.shape:
            e = replace(e, dtype=param.dtype)
        out[name] = e
    return out


def _plan_of(opt: OptimizerState, final: State, target: TargetSignature | None) -> OptimizerPlan:
    groups, kept = _assign(opt, final, target)
    name_of = opt.name_of()
    with_state = {s.id for s in opt.state}
    carried = tuple((name_of[i], k) for k, i in kept.items() if i in with_state)
    used = set(kept.values())
    dropped = tuple(name_of[i] for i in opt.ids if i not in used and i in with_state)
    fresh = tuple(k for keys in groups for k in keys if k not in kept or kept[k] not in with_state)
    cast = tuple(k for k in kept if final[k].dtype != final[k].source_dtype)
    return OptimizerPlan(
        opt.path, opt.kind, opt.mapped_by, tuple(len(g) for g in groups), carried, dropped, fresh, cast
    )


def _also_state(
    ckpt: Checkpoint, key: str, operations: Sequence[Operation], target: TargetSignature | None
) -> tuple[str, State, tuple[Step, ...], dict[str, Any] | None]:
    """A sibling state dict given the plan's operations: its path, planned entries, steps and ``_metadata``."""
    from ..objects import rename_metadata

    walked, obj = resolve_key(ckpt.root, key, ckpt.path, [])
    if walked == ckpt.state_path:
        raise UsageError(f"--also-key {key}: is the state dict itself (--key)")
    if state_objects(obj):
        raise UsageError(
            f"--also-key {key}: holds entries that are not tensors (_extra_state); ckpt carries "
            "those in the main state dict only"
        )
    applied = apply(tuple(operations), initial_state(to_state_dict(obj, ckpt.path)), target)
    meta = module_metadata(obj)
    if meta is not None:
        moved = {e.origin: k for k, e in applied.state.items() if e.source == CHECKPOINT}
        meta = rename_metadata(meta, operations, moved)
    return walked, applied.state, applied.steps, meta


# --- after the write ------------------------------------------------------------------------------


def verify_carried(
    written: Any, carried: Carried, *, target_chunks: Any, cast: Any, whole: str | None = None
) -> tuple[list[str], int]:
    """Re-read the written training state: every tensor byte for byte against its source (cast as
    planned), every other value equal to the plan's. Returns (what differs, tensors compared).

    ``whole``: the file is that one entry alone (a Trainer's ``optimizer.pt`` is the optimizer state)."""
    from ..reader import read_raw, walk_key
    from ..verify import compare_values, same_tree

    root = read_raw(written.path).root
    if whole is not None:
        root = {whole: root}
    found: dict[str, TensorRef] = {}
    for key in carried.state:
        obj = walk_key(root, key[len(CARRIED) :])[0]
        if isinstance(obj, PickledTensor):
            found[key] = tensor_ref(key, obj, written.path)
    differ, checked = compare_values(found, carried.state, written, target_chunks=target_chunks, cast=cast)
    for name, planned in carried.extras.items():
        if not same_tree(planned, walk_key(root, name)[0]):
            differ.append(name)
    return differ, checked
