"""Would this state dict load into that target with ``load_state_dict(strict=True)``? The one answer.

Every command that asks (diff, migrate's plan and verification, ``--reinit-mismatched``, validate's
architecture policies, finetune-check's load) asks :func:`check`. It follows
``torch.nn.Module._load_from_state_dict`` and ``load_state_dict``:

- a key of the target (parameter or persistent buffer) absent from the state is *missing*, except
  BatchNorm's ``num_batches_tracked`` when the state's ``_metadata`` gives its module no version
  >= 2 (torch fills it in itself: *auto-filled*);
- a key the target has no place for is *unexpected*; so is an ``_extra_state`` entry for a module
  without ``set_extra_state``, while a module that has one requires its ``_extra_state``;
- a shape is accepted when equal, or a 1-element vector for a 0-d parameter (torch's 0.3 -> 0.4
  rule); anything else is a size mismatch;
- a tie group of the target (keys that are one tensor on the built model, GPT-2's
  ``lm_head.weight`` and ``transformer.wte.weight``) is satisfied when any member loads: the absent
  members are *tied*, not missing (safetensors' ``load_model`` and transformers load such files;
  ``ckpt migrate --fill-missing`` writes the alias from its partner for a plain ``load_state_dict``).

No torch is imported here: states are key -> shape (or anything with ``.shape``).
"""

from __future__ import annotations

from collections.abc import Collection, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from .arch import TargetSignature, TargetTensor
from .bulk import fast_constructor
from .checkpoint import Checkpoint, numel

EXTRA_STATE_SUFFIX = "_extra_state"
# under this share of an architecture's parameters from the checkpoint, it is taken for the wrong one
MOSTLY_NEW_SHARE = 0.5


@dataclass(frozen=True)
class Mismatch:
    """A key whose shape ``load_state_dict`` rejects: the checkpoint's ``shape``, the target's ``target_shape``."""

    key: str
    shape: tuple[int, ...]
    target_shape: tuple[int, ...]


@dataclass(frozen=True)
class Compatibility:
    """What a strict load of a state into a target would say, and how each target key is met.

    ``missing``, ``unexpected`` and ``mismatched`` are what ``load_state_dict(strict=True)``
    rejects; ``loaded`` the target keys the state fills; ``auto_filled`` the absent keys torch
    fills in itself; ``tied`` the ``(absent alias, present partner)`` pairs of the target's tie groups.
    """

    missing: tuple[str, ...] = ()
    unexpected: tuple[str, ...] = ()
    mismatched: tuple[Mismatch, ...] = ()
    loaded: tuple[str, ...] = ()
    auto_filled: tuple[str, ...] = ()
    tied: tuple[tuple[str, str], ...] = ()

    @property
    def loads(self) -> bool:
        return not (self.missing or self.unexpected or self.mismatched)

    def to_json(self) -> dict[str, Any]:
        return {
            "loads": self.loads,
            "missing": list(self.missing),
            "unexpected": list(self.unexpected),
            "mismatched": [
                {"key": m.key, "shape": list(m.shape), "target_shape": list(m.target_shape)} for m in self.mismatched
            ],
            "auto_filled": list(self.auto_filled),
            "tied": [list(t) for t in self.tied],
        }


class _AllCurrent(Mapping[str, int]):
    """``_metadata`` of a state dict that ``state_dict()`` of current modules just made: every version current."""

    def __getitem__(self, module: str) -> int:
        return 2

    def __iter__(self) -> Iterator[str]:
        return iter(())

    def __len__(self) -> int:
        return 0

    def get(self, module: str, default: Any = None) -> int:
        return 2


ALL_CURRENT: Mapping[str, int | None] = _AllCurrent()


def shapes_load(shape: tuple[int, ...], target_shape: tuple[int, ...]) -> bool:
    """Whether ``load_state_dict`` accepts a tensor of ``shape`` for a parameter of ``target_shape``.

    Example:
        >>> shapes_load((1,), ()), shapes_load((), (1,)), shapes_load((2,), ())
        (True, False, False)
    """
    if shape == target_shape:  # two equal tuples: nearly every key of a diff
        return True
    shape, target_shape = tuple(shape), tuple(target_shape)
    return shape == target_shape or (target_shape == () and shape == (1,))


def check(
    state: Mapping[str, Any],
    target: TargetSignature,
    *,
    versions: Mapping[str, int | None] | None = None,
    objects: Collection[str] = (),
) -> Compatibility:
    """Compare a state (key -> shape tuple, or anything with ``.shape``) with a target, as torch's strict load would.

    Args:
        state: the tensors to load, by key.
        target: the target's signature (:func:`ckpt_tool.arch.target_signature` or
            :func:`ckpt_tool.arch.signature_from_model`).
        versions: the state's ``_metadata`` as module -> version; ``None`` when it carries none
            (safetensors, a plain dict): then torch fills every ``num_batches_tracked`` in.
        objects: keys of the state that hold objects rather than tensors (``_extra_state``).

    Example:
        >>> sig = TargetSignature("net", {}, {"scale": TargetTensor((), "float32", "parameter")})
        >>> check({"scale": (1,)}, sig).loads, check({"scale": (2,)}, sig).mismatched[0].target_shape
        (True, ())
    """
    tgt = target.tensors
    extra = set(target.extra_state)
    if not objects and all(type(v) is tuple for v in state.values()):  # shapes already (check_checkpoint's)
        shapes: Mapping[str, tuple[int, ...]] = state
    else:
        shapes = {k: _shape(v) for k, v in state.items() if k not in objects}
    present = set(state)
    fills = set(auto_filled(target, present, versions))

    loaded: list[str] = []
    mismatched: list[Mismatch] = []
    absent: list[str] = []
    shape_of = shapes.get
    for key, t in tgt.items():
        if extra and key in extra:  # set_extra_state takes whatever is there: no shape to check
            continue
        shape = shape_of(key)
        if shape is None:
            if key not in present:
                absent.append(key)
            else:  # an object where torch expects a tensor: it refuses it
                mismatched.append(Mismatch(key, (), t.shape))
        elif shape == t.shape or shapes_load(shape, t.shape):
            loaded.append(key)
        else:
            mismatched.append(Mismatch(key, shape, t.shape))
    done = set(loaded)
    tied: list[tuple[str, str]] = []
    partners = target.partners()
    missing: list[str] = []
    for key in absent:
        partner = next((p for p in partners.get(key, ()) if p in done), None)
        if partner is not None:
            tied.append((key, partner))
        elif key not in fills:
            missing.append(key)
    missing += [k for k in target.extra_state if k not in present]
    unexpected = [k for k in state if k not in tgt and k not in extra]
    return Compatibility(
        tuple(missing),
        tuple(unexpected),
        tuple(mismatched),
        tuple(loaded),
        tuple(k for k in absent if k in fills),
        tuple(tied),
    )


def check_module(
    model: Any,
    state: Mapping[str, Any],
    *,
    versions: Mapping[str, int | None] | None = None,
    objects: Collection[str] = (),
) -> Compatibility:
    """:func:`check` against a built ``nn.Module`` (finetune-check's load): ``state`` may hold tensors.

    Load exactly what it says loads: ``model.load_state_dict({k: state[k] for k in result.loaded}, strict=False)``.
    """
    from .arch import signature_from_model

    return check(state, signature_from_model(model), versions=versions, objects=objects)


def auto_filled(
    target: TargetSignature, present: Collection[str], versions: Mapping[str, int | None] | None = None
) -> tuple[str, ...]:
    """Target keys absent from ``present`` that ``load_state_dict`` adds itself, so does not call missing.

    ``_NormBase._load_from_state_dict`` inserts ``num_batches_tracked`` when the state dict's
    ``_metadata`` gives the module no version >= 2.
    """
    out = []
    for key in target.auto_filled:
        version = (versions or {}).get(key.rpartition(".")[0])
        if key not in present and (version is None or version < 2):
            out.append(key)
    return tuple(out)


def parameter_share(target: TargetSignature, from_checkpoint: Collection[str]) -> float:
    """Share of the target's parameter elements whose values come from the checkpoint (a tie group counts once).

    The wrong-architecture guard: under one half, the checkpoint is not a version of this model.
    """
    done = set(from_checkpoint)
    total = got = 0
    seen: set[str] = set()
    partners = target.partners()
    for key, t in target.tensors.items():
        if t.kind != "parameter" or key in seen:
            continue
        group = (key, *partners.get(key, ()))
        seen.update(group)
        total += numel(t.shape)
        got += numel(t.shape) if any(k in done for k in group) else 0
    return got / total if total else 1.0


def signature_of_state(state: Mapping[str, Any], spec: str = "checkpoint") -> TargetSignature:
    """A checkpoint's own tensors as a target (diff of two checkpoints): no fill-ins, no ties."""
    new = _target_tensor
    return TargetSignature(
        spec, {}, {k: new(_shape(v), str(getattr(v, "dtype", "")), "tensor") for k, v in state.items()}
    )


_target_tensor = fast_constructor(TargetTensor)


# --- a checkpoint as the state: its _metadata, its aliases, its objects ---------------------------


def check_checkpoint(ckpt: Checkpoint, target: TargetSignature) -> Compatibility:
    """:func:`check` of a checkpoint's chosen state dict, with what the file says beside its tensors.

    The state dict's pickled ``_metadata`` decides torch's ``num_batches_tracked`` fill-ins; the
    aliases ckpt records in a safetensors file it wrote (``ckpt.aliases``: names of one tensor
    written once) count as present; ``_extra_state`` entries that hold objects count as present.
    """
    state: dict[str, Any] = {k: t.shape for k, t in ckpt.tensors.items()}
    for alias, name in checkpoint_aliases(ckpt).items():
        if name in state and alias not in state:
            state[alias] = state[name]
    objects = [k for k in state_objects(ckpt) if k not in state]
    state.update(dict.fromkeys(objects, ()))
    return check(state, target, versions=module_versions(ckpt), objects=objects)


def checkpoint_aliases(ckpt: Checkpoint) -> dict[str, str]:
    """Alias -> written name, from the ``ckpt.aliases`` metadata of a safetensors file ckpt wrote."""
    import json

    try:
        aliases = json.loads(ckpt.metadata.get("ckpt.aliases", "{}"))
    except ValueError:
        return {}
    if not isinstance(aliases, dict):
        return {}
    return {str(a): str(n) for a, n in aliases.items() if isinstance(n, str)}


def state_objects(ckpt: Checkpoint) -> tuple[str, ...]:
    """Keys of the chosen state dict that hold objects torch loads as they are (``_extra_state``)."""
    obj = _state_object(ckpt)
    if not isinstance(obj, dict):
        return ()
    return tuple(str(k) for k in obj if str(k).rpartition(".")[2] == EXTRA_STATE_SUFFIX)


def module_versions(ckpt: Checkpoint) -> Mapping[str, int | None] | None:
    """Module path -> version from the state dict's pickled ``_metadata``.

    ``None`` when it carries none (safetensors, sharded, a plain dict); :data:`ALL_CURRENT` for a
    pickled module tree (``state_dict()`` of current modules records current versions).
    """
    from .formats.pickle_vm import PickledOrderedDict, Placeholder

    if ckpt.root is None:
        return None
    obj = _state_object(ckpt)
    if isinstance(obj, Placeholder):
        if obj.dictitems is None or not isinstance(obj.dictitems, PickledOrderedDict):
            return ALL_CURRENT
        obj = obj.dictitems
    if not isinstance(obj, PickledOrderedDict):
        return None
    metadata = (obj.attributes or {}).get("_metadata")
    if not isinstance(metadata, dict):
        return None
    return {
        str(m): v.get("version") if isinstance(v, dict) and isinstance(v.get("version"), int) else None
        for m, v in metadata.items()
    }


def _state_object(ckpt: Checkpoint) -> Any:
    from .reader import resolve_key

    if ckpt.root is None:
        return None
    return resolve_key(ckpt.root, ckpt.state_path, ckpt.path, [])[1] if ckpt.state_path else ckpt.root


def _shape(value: Any) -> tuple[int, ...]:
    if isinstance(value, tuple):
        return value
    shape = value.shape
    if type(shape) is tuple:  # a TensorRef's: already plain ints (a torch.Size is a subclass)
        return shape
    return tuple(int(d) for d in shape)
