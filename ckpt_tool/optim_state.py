"""Training state through surgery: optimizer state, schedulers, scalers, counters and EMA copies.

torch's ``optimizer.state_dict()`` names parameters by integer ids: their positions in the param
groups as the optimizer was built, which for the usual ``model.parameters()`` is the model's
parameter order. To carry the state through a plan, each id is first tied to a parameter name of
the source (:func:`map_ids`); the state of a kept parameter then follows it to its new name and
position, a dropped parameter's state goes, a filled or re-initialised parameter gets none (the
optimizer starts it fresh, as torch does for a new parameter) and a cast parameter's moments are
cast with it (``step`` is not: torch never casts it either).

Header-only and torch-free: the output tree holds :class:`~ckpt_tool.writer.TensorSlot` markers
where tensors go; the planned values are :class:`~ckpt_tool.plan.Entry` objects under keys that
start with :data:`CARRIED`, streamed by the writer like any other tensor.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from .arch import TargetSignature
from .errors import UsageError
from .formats.pickle_vm import PickledTensor, Placeholder
from .model import Checkpoint, TensorRef, is_floating
from .plan import CHECKPOINT, Entry, Operation, Plan, State, Step, apply, initial_state
from .reader import module_metadata, resolve_key, sibling_entries, state_objects, tensor_ref, to_state_dict
from .writer import PTH, StateDictValue, TensorSlot

CARRIED = "@"  # planned entries under keys starting with this live outside the state dict
# state-dict entries that are buffers whatever the architecture (never optimizer parameters)
BUFFER_NAMES = ("running_mean", "running_var", "num_batches_tracked")
# operations after which the target's parameters are the source's, renamed, in the same order
_RENAMES = ("strip_prefix", "add_prefix", "rename", "map", "cast")


class MappingError(UsageError):
    """The optimizer's parameter ids cannot be tied to parameter names without guessing."""


# --- reading --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ParamGroup:
    """One param group: its hyper-parameters (everything but ``params``) and its parameter ids."""

    hyper: tuple[tuple[str, Any], ...]
    params: tuple[int | str, ...]


@dataclass(frozen=True)
class ParamState:
    """What the optimizer keeps for one parameter id: tensors (``exp_avg``) and plain values."""

    id: int | str
    tensors: tuple[tuple[str, TensorRef], ...]
    values: tuple[tuple[str, Any], ...] = ()


@dataclass(frozen=True)
class OptimizerState:
    """An ``optimizer.state_dict()`` found in a checkpoint (``path`` as ``--key`` spells it).

    ``fqn`` is True for state keyed by parameter names (``get_optimizer_state_dict``); ``names``
    ties ids to the source's parameter names once known, ``mapped_by`` says how.
    """

    path: str
    kind: str
    fqn: bool
    groups: tuple[ParamGroup, ...]
    state: tuple[ParamState, ...]
    names: tuple[tuple[int | str, str], ...] = ()
    mapped_by: str = ""
    raw: Any = field(default=None, compare=False, repr=False)

    @property
    def ids(self) -> list[int | str]:
        """Every parameter id, in group order (torch's own numbering order)."""
        return [i for g in self.groups for i in g.params]

    def name_of(self) -> dict[int | str, str]:
        return dict(self.names)


def is_optimizer_state(value: Any) -> bool:
    return (isinstance(value, dict) and isinstance(value.get("state"), dict)
            and isinstance(value.get("param_groups"), list))


def find_optimizers(ckpt: Checkpoint) -> tuple[OptimizerState, ...]:
    """The optimizer states beside the chosen state dict: ``optimizer`` or Lightning's ``optimizer_states/N``."""
    found: list[OptimizerState] = []
    if ckpt.root is None:
        return ()
    for name, value in sibling_entries(ckpt.root, ckpt.state_path):
        if is_optimizer_state(value):
            found.append(read_optimizer(value, name, ckpt.path))
        elif isinstance(value, (list, tuple)) and value and all(is_optimizer_state(v) for v in value):
            found.extend(read_optimizer(v, f"{name}/{i}", ckpt.path) for i, v in enumerate(value))
    return tuple(found)


def read_optimizer(raw: dict[str, Any], path: str, file: str) -> OptimizerState:
    """Describe one ``optimizer.state_dict()`` (header-only: tensors as :class:`TensorRef`)."""
    groups = []
    for g in raw["param_groups"]:
        if not isinstance(g, dict) or not isinstance(g.get("params"), list):
            raise UsageError(f"{file}: {path}: a param group without a 'params' list")
        groups.append(ParamGroup(tuple((str(k), v) for k, v in g.items() if k != "params"), tuple(g["params"])))
    state = []
    for pid, values in raw["state"].items():
        if not isinstance(values, dict):
            continue
        tensors = tuple((str(n), tensor_ref(f"{path}/state/{pid}/{n}", v, file)) for n, v in values.items()
                        if isinstance(v, PickledTensor))
        plain = tuple((str(n), v) for n, v in values.items() if not isinstance(v, PickledTensor))
        state.append(ParamState(pid, tensors, plain))
    ids = [i for g in groups for i in g.params]
    fqn = bool(ids) and all(isinstance(i, str) for i in ids)
    names: tuple[tuple[int | str, str], ...] = ()
    mapped_by = ""
    if fqn:
        names, mapped_by = tuple((i, str(i)) for i in ids), "names stored in the state"
    elif all("param_names" in dict(g.hyper) for g in groups):
        # torch >= 2.6 keeps the names when the optimizer was given model.named_parameters()
        pairs = [(i, n) for g in groups for i, n in zip(g.params, dict(g.hyper)["param_names"])]
        if all(isinstance(n, str) for _, n in pairs):
            names, mapped_by = tuple((i, str(n)) for i, n in pairs), "param_names in the param groups"
    return OptimizerState(path, _kind(groups, state), fqn, tuple(groups), tuple(state), names, mapped_by, raw)


def _kind(groups: Sequence[ParamGroup], state: Sequence[ParamState]) -> str:
    """The optimizer class, as far as its hyper-parameters and state names tell (torch does not store it)."""
    hyper = dict(groups[0].hyper) if groups else {}
    names = {n for s in state for n, _ in s.tensors} | {n for s in state for n, _ in s.values}
    if "exp_avg_sq" in names or "betas" in hyper:
        return "AdamW" if hyper.get("decoupled_weight_decay") is True else "Adam"
    if "momentum_buffer" in names or ("momentum" in hyper and "dampening" in hyper):
        return "SGD"
    for key, kind in (("sum", "Adagrad"), ("square_avg", "RMSprop"), ("prev", "Rprop")):
        if key in names:
            return kind
    return "unknown"


# --- which id is which parameter ------------------------------------------------------------------


def map_ids(opt: OptimizerState, ckpt: Checkpoint, operations: Sequence[Operation], final: State, *,
            source: TargetSignature | None = None, target: TargetSignature | None = None) -> OptimizerState:
    """Tie every id of ``opt`` to a source parameter name, or raise :class:`MappingError`.

    In order: names stored with the state; ``source`` (``--source-arch``); ``target`` (``--arch``)
    when the plan only renames; the state dict's tensors minus its buffers. Each candidate order is
    checked against the state: as many parameters as ids, every moment shaped like its parameter.
    """
    ids = opt.ids
    if opt.names:
        # names of the model as trained; a checkpoint saved from its wrapper prefixes them (module.)
        order = [_checkpoint_key(n, ckpt) for _, n in opt.names]
        _check(opt, order, ckpt, opt.mapped_by)
        return replace(opt, names=tuple(zip(ids, order)))
    if len(set(ids)) != len(ids):
        raise MappingError(f"{ckpt.path}: {opt.path}: a parameter id appears in two param groups")
    if source is not None:
        by = f"--source-arch {source.spec}"
        order = [_checkpoint_key(k, ckpt) for k in parameter_order(source)]
    elif target is not None and all(op.op in _RENAMES for op in operations):
        by = f"--arch {target.spec} (the plan only renames)"
        back = {k: e.origin for k, e in final.items() if e.from_checkpoint}
        order = [back.get(k, k) for k in parameter_order(target)]
    else:
        by = "the state dict (its tensors minus buffers)"
        order = _state_dict_parameters(ckpt, final, target)
    _check(opt, order, ckpt, by)
    return replace(opt, names=tuple(zip(ids, order)), mapped_by=by)


def _checkpoint_key(name: str, ckpt: Checkpoint) -> str:
    """The checkpoint's key for a parameter name: itself, or the one key that ends with ``.name``."""
    if name in ckpt.tensors:
        return name
    found = [k for k in ckpt.tensors if k.endswith("." + name)]
    return found[0] if len(found) == 1 else name


def parameter_order(signature: TargetSignature) -> list[str]:
    """``model.parameters()`` order: the state dict's parameters, a tied alias counted once (as torch does)."""
    aliases = {k for group in signature.ties for k in group[1:]}
    return [k for k, t in signature.tensors.items() if t.kind == "parameter" and k not in aliases]


def _state_dict_parameters(ckpt: Checkpoint, final: State, target: TargetSignature | None) -> list[str]:
    """The source's keys that can be parameters: floating tensors that are not known buffers, a tensor
    viewing the same bytes as an earlier one (a tie) once."""
    buffers: set[str] = set()
    if target is not None:
        buffers = {e.origin for k, e in final.items() if e.from_checkpoint and k in target.tensors
                   and target.tensors[k].kind == "buffer"}
    seen: set[tuple[Any, ...]] = set()
    order = []
    for key, ref in ckpt.tensors.items():
        view = (ref.storage, ref.storage_offset, ref.shape, ref.stride)
        if key in buffers or key.rpartition(".")[2] in BUFFER_NAMES or not is_floating(ref.dtype) or view in seen:
            continue
        seen.add(view)
        order.append(key)
    return order


def _check(opt: OptimizerState, order: list[str], ckpt: Checkpoint, by: str) -> None:
    where = f"{ckpt.path}: {opt.path}"
    hint = "pass --source-arch SPEC (the model that was trained), or --drop-optimizer to leave it out"
    ids = opt.ids
    if len(order) != len(ids):
        raise MappingError(f"{where}: {len(ids)} parameter ids, but {by} gives {len(order)} parameters; "
                           f"cannot tell which id is which ({hint})")
    name_of = dict(zip(ids, order))
    for s in opt.state:
        name = name_of.get(s.id)
        ref = ckpt.tensors.get(name) if name is not None else None
        if name is None or ref is None:
            raise MappingError(f"{where}: state of id {s.id!r} names no parameter of the checkpoint"
                               f"{f' ({name!r})' if name else ''} ({hint})")
        for n, t in s.tensors:
            if t.shape and t.shape != ref.shape:
                raise MappingError(f"{where}: id {s.id!r} maps to {name!r} {list(ref.shape)} by {by}, but its "
                                   f"{n} is {list(t.shape)}: the ids do not follow that order ({hint})")


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


def training_state(ckpt: Checkpoint, plan: Plan, final: State, target: TargetSignature | None, fmt: str, *,
                   sharded: bool = False) -> Carried | None:
    """The training state ``plan`` carries beside ``final`` (its planned state dict), or ``None`` when
    there is none to carry (no optimizer state and no ``--also-key``) or the output has no place for
    it (then migrate drops it, listed, as any entry that is not plain data)."""
    optimizers = find_optimizers(ckpt)
    if not optimizers and not plan.also_keys:
        return None
    if fmt != PTH or sharded:
        if plan.also_keys:
            raise UsageError(f"--also-key {plan.also_keys[0]}: only a single .pth output holds a second state dict "
                             "(write one .pth, without --max-shard-size)")
        return None
    if plan.drop_optimizer and not plan.also_keys:
        return None
    from .arch import target_signature

    source = target_signature(plan.source_arch, {}) if plan.source_arch else None
    return carry(ckpt, plan.operations, final, target=target, source=source, also_keys=plan.also_keys,
                 optimizers=() if plan.drop_optimizer else optimizers,
                 drop=tuple(o.path for o in optimizers) if plan.drop_optimizer else ())


def carry(ckpt: Checkpoint, operations: Sequence[Operation], final: State, *, target: TargetSignature | None,
          source: TargetSignature | None = None, also_keys: Sequence[str] = (),
          optimizers: Sequence[OptimizerState] = (), drop: Sequence[str] = ()) -> Carried:
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


def _tree(value: Any, path: str, out: Carried, opts: Mapping[str, OptimizerState],
          also: Mapping[str, tuple[State, dict[str, Any] | None]], final: State,
          target: TargetSignature | None) -> Any:
    """``value`` as the writer writes it: plain data, tensors as slots; optimizer states re-keyed."""
    if path in out.drop_paths:
        raise _NotCarried("optimizer state (--drop-optimizer)")
    if path in opts:
        return _tree(_rekeyed(opts[path], final, target), path, out, {}, {}, final, target)
    if path in also:
        entries, meta = also[path]
        for k, e in entries.items():
            out.state[_slot_key(path, k)] = replace(e, key=_slot_key(path, k))
        return StateDictValue({k: TensorSlot(_slot_key(path, k)) for k in entries},
                              {"_metadata": meta} if meta is not None else None)
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


def _assign(opt: OptimizerState, final: State, target: TargetSignature | None
            ) -> tuple[list[list[str]], dict[str, int | str]]:
    """Output parameters per group (model order within a group), and each kept one's old id.

    A kept parameter stays in its group, a re-initialised one takes the group of the one it replaces,
    an added one joins the group of the parameter before it (the first group's, if none).
    """
    old_id = {name: i for i, name in opt.name_of().items()}
    group_of = {i: g for g, group in enumerate(opt.groups) for i in group.params}
    groups: list[list[str]] = [[] for _ in opt.groups]
    kept: dict[str, int | str] = {}
    last = 0
    for key in _new_order(opt, final, target):
        e = final[key]
        origin = e.origin if e.from_checkpoint and not e.tied_to else e.replaces
        if origin in old_id:
            last = group_of[old_id[origin]]
            if e.from_checkpoint:
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
    ordered = dict(sorted(new_state.items(), key=lambda kv: ids_order(kv[0], new_groups)))
    return {**{k: v for k, v in src.items() if k not in ("state", "param_groups")},
            "state": ordered, "param_groups": new_groups}


def ids_order(pid: int | str, groups: list[dict[str, Any]]) -> int:
    flat = [i for g in groups for i in g["params"]]
    return flat.index(pid)


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
    cast = tuple(k for k, _ in ((k, i) for k, i in kept.items()) if final[k].dtype != final[k].source_dtype)
    return OptimizerPlan(opt.path, opt.kind, opt.mapped_by, tuple(len(g) for g in groups), carried, dropped,
                         fresh, cast)


def _also_state(ckpt: Checkpoint, key: str, operations: Sequence[Operation], target: TargetSignature | None
                ) -> tuple[str, State, tuple[Step, ...], dict[str, Any] | None]:
    """A sibling state dict given the plan's operations: its path, planned entries, steps and ``_metadata``."""
    from .objects import rename_metadata

    walked, obj = resolve_key(ckpt.root, key, ckpt.path, [])
    if walked == ckpt.state_path:
        raise UsageError(f"--also-key {key}: is the state dict itself (--key)")
    if state_objects(obj):
        raise UsageError(f"--also-key {key}: holds entries that are not tensors (_extra_state); ckpt carries "
                         "those in the main state dict only")
    applied = apply(tuple(operations), initial_state(to_state_dict(obj, ckpt.path)), target)
    meta = module_metadata(obj)
    if meta is not None:
        moved = {e.origin: k for k, e in applied.state.items() if e.source == CHECKPOINT}
        meta = rename_metadata(meta, operations, moved)
    return walked, applied.state, applied.steps, meta


def carried_entries(state: State) -> Iterator[tuple[str, Entry]]:
    return ((k, e) for k, e in state.items() if k.startswith(CARRIED))


# --- after the write ------------------------------------------------------------------------------


def verify_carried(written: Any, carried: Carried, *, target_chunks: Any, cast: Any) -> tuple[list[str], int]:
    """Re-read the written training state: every tensor byte for byte against its source (cast as
    planned), every other value equal to the plan's. Returns (what differs, tensors compared)."""
    from .reader import read_raw, walk_key
    from .verify import compare_values

    root = read_raw(written.path).root
    found: dict[str, TensorRef] = {}
    for key in carried.state:
        obj = walk_key(root, key[len(CARRIED):])[0]
        if isinstance(obj, PickledTensor):
            found[key] = tensor_ref(key, obj, written.path)
    differ, checked = compare_values(found, carried.state, written, target_chunks=target_chunks, cast=cast)
    for name, planned in carried.extras.items():
        if not _same_tree(planned, walk_key(root, name)[0]):
            differ.append(name)
    return differ, checked


def _same_tree(planned: Any, got: Any) -> bool:
    if isinstance(planned, TensorSlot):
        return isinstance(got, PickledTensor)
    if isinstance(planned, StateDictValue):
        return _same_tree(planned.items, got)
    if isinstance(planned, dict):
        return (isinstance(got, dict) and list(planned) == list(got)
                and all(_same_tree(v, got[k]) for k, v in planned.items()))
    if isinstance(planned, (list, tuple)):
        return (type(got) is type(planned) and len(got) == len(planned)
                and all(_same_tree(a, b) for a, b in zip(planned, got)))
    return type(planned) is type(got) and (planned == got or planned != planned and got != got)


# --- describing (inspect) -------------------------------------------------------------------------


@dataclass(frozen=True)
class GroupRow:
    """One param group as ``inspect`` shows it: its size and hyper-parameters (summarized)."""

    index: int
    params: int
    hyper: dict[str, Any]


@dataclass(frozen=True)
class StateRow:
    """One parameter id's state: the parameter it is (when known) and its tensors (name, shape, dtype)."""

    id: str
    parameter: str
    group: int
    tensors: tuple[tuple[str, tuple[int, ...], str], ...]
    values: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class OptimizerSummary:
    path: str
    kind: str
    groups: tuple[GroupRow, ...]
    state: tuple[StateRow, ...]
    tensors: int
    tensor_bytes: int
    mapped_by: str = ""  # how ids were tied to parameter names; empty when they could not be
    unmapped: str = ""  # why not


def summarize_optimizers(ckpt: Checkpoint) -> tuple[OptimizerSummary, ...]:
    """The optimizer states beside ``ckpt``'s state dict, described header-only (no tensor bytes)."""
    from .reader import summarize

    out = []
    for opt in find_optimizers(ckpt):
        unmapped = ""
        try:
            opt = map_ids(opt, ckpt, (), initial_state(ckpt.tensors))
        except UsageError as exc:
            unmapped = str(exc).partition(": ")[2].partition(" (pass")[0]
        names = opt.name_of()
        group_of = {i: g for g, group in enumerate(opt.groups) for i in group.params}
        rows = tuple(StateRow(str(s.id), names.get(s.id, ""), group_of.get(s.id, -1),
                              tuple((n, r.shape, r.dtype) for n, r in s.tensors),
                              {n: summarize(v) for n, v in s.values}) for s in opt.state)
        groups = tuple(GroupRow(i, len(g.params), {k: summarize(v) for k, v in g.hyper if k != "param_names"})
                       for i, g in enumerate(opt.groups))
        refs = [r for s in opt.state for _, r in s.tensors]
        out.append(OptimizerSummary(opt.path, opt.kind, groups, rows, len(refs), sum(r.nbytes for r in refs),
                                    opt.mapped_by, unmapped))
    return tuple(out)
