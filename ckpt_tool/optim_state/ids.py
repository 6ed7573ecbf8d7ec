"""Optimizer states as found in a checkpoint, and which parameter each id is (header-only, no torch)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from ..arch import TargetSignature
from ..checkpoint import BUFFER_NAMES, Checkpoint, TensorRef, is_floating
from ..errors import UsageError
from ..formats.pickle_vm import PickledTensor
from ..plan import Operation, State
from ..reader import sibling_entries, tensor_ref

# state-dict entries that are buffers whatever the architecture (never optimizer parameters)
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
    # the output's param groups (output parameter names) when a trainer decides them (the HF
    # Trainer's weight decay / no weight decay split); empty: each kept parameter keeps its group
    regroup: tuple[tuple[str, ...], ...] = ()

    @property
    def ids(self) -> list[int | str]:
        """Every parameter id, in group order (torch's own numbering order)."""
        return [i for g in self.groups for i in g.params]

    def name_of(self) -> dict[int | str, str]:
        return dict(self.names)


def is_optimizer_state(value: Any) -> bool:
    return (
        isinstance(value, dict) and isinstance(value.get("state"), dict) and isinstance(value.get("param_groups"), list)
    )


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
        tensors = tuple(
            (str(n), tensor_ref(f"{path}/state/{pid}/{n}", v, file))
            for n, v in values.items()
            if isinstance(v, PickledTensor)
        )
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


def map_ids(
    opt: OptimizerState,
    ckpt: Checkpoint,
    operations: Sequence[Operation],
    final: State,
    *,
    source: TargetSignature | None = None,
    target: TargetSignature | None = None,
) -> OptimizerState:
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


def map_ids_by_groups(
    opt: OptimizerState, ckpt: Checkpoint, groups: Sequence[Sequence[str]], by: str
) -> OptimizerState:
    """Tie ids to names when the param groups were built from known name lists (``groups``, in
    order): the ids number them group after group, as torch numbers ``param_groups``. Raises
    :class:`MappingError` when the group sizes or the moments' shapes say otherwise."""
    sizes = [len(g.params) for g in opt.groups]
    if sizes != [len(g) for g in groups]:
        raise MappingError(
            f"{ckpt.path}: {opt.path}: param groups of {sizes} parameters, but {by} gives "
            f"{[len(g) for g in groups]}; cannot tell which id is which (pass --source-arch SPEC, the "
            "model that was trained, or --drop-optimizer to leave it out)"
        )
    order = [_checkpoint_key(n, ckpt) for g in groups for n in g]
    _check(opt, order, ckpt, by)
    return replace(opt, names=tuple(zip(opt.ids, order)), mapped_by=by)


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
        buffers = {
            e.origin
            for k, e in final.items()
            if e.from_checkpoint and k in target.tensors and target.tensors[k].kind == "buffer"
        }
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
        raise MappingError(
            f"{where}: {len(ids)} parameter ids, but {by} gives {len(order)} parameters; "
            f"cannot tell which id is which ({hint})"
        )
    problems = moment_problems(opt, dict(zip(ids, order)), ckpt)
    if problems:
        raise MappingError(f"{where}: {problems[0]} by {by}: the ids do not follow that order ({hint})")


def moment_problems(opt: OptimizerState, name_of: Mapping[int | str, str], ckpt: Checkpoint) -> list[str]:
    """State that does not fit the parameter its id names: no such parameter, or a moment of another shape."""
    out = []
    for s in opt.state:
        name = name_of.get(s.id)
        ref = ckpt.tensors.get(name) if name is not None else None
        if name is None or ref is None:
            out.append(f"state of id {s.id!r} names no parameter of the checkpoint{f' ({name!r})' if name else ''}")
            continue
        out.extend(
            f"id {s.id!r} is {name!r} {list(ref.shape)}, but its {n} is {list(t.shape)}"
            for n, t in s.tensors
            if t.shape and t.shape != ref.shape
        )
    return out
