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
from .model import numel

EXTRA_STATE_SUFFIX = "_extra_state"


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
        return {"loads": self.loads, "missing": list(self.missing), "unexpected": list(self.unexpected),
                "mismatched": [{"key": m.key, "shape": list(m.shape), "target_shape": list(m.target_shape)}
                               for m in self.mismatched],
                "auto_filled": list(self.auto_filled), "tied": [list(t) for t in self.tied]}


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
    return tuple(shape) == tuple(target_shape) or (tuple(target_shape) == () and tuple(shape) == (1,))


def check(state: Mapping[str, Any], target: TargetSignature, *,
          versions: Mapping[str, int | None] | None = None, objects: Collection[str] = ()) -> Compatibility:
    """Compare a state (key -> shape tuple, or anything with ``.shape``) with a target, as torch's strict load would.

    Args:
        state: the tensors to load, by key.
        target: the target's signature (:func:`ckpt_tool.arch.target_signature` or
            :func:`ckpt_tool.arch.signature_from_model`).
        versions: the state's ``_metadata`` as module -> version; ``None`` when it carries none
            (safetensors, a plain dict): then torch fills every ``num_batches_tracked`` in.
        objects: keys of the state that hold objects rather than tensors (``_extra_state``).

    Example:
        >>> sig = target_signature("resnet18", {"num_classes": 10})
        >>> check({k: t.shape for k, t in ckpt.tensors.items()}, sig).mismatched[0].key
        'fc.weight'
    """
    tgt = target.tensors
    extra = set(target.extra_state)
    shapes = {k: _shape(v) for k, v in state.items() if k not in objects}
    present = set(state)
    fills = set(auto_filled(target, present, versions))

    loaded: list[str] = []
    mismatched: list[Mismatch] = []
    absent: list[str] = []
    for key, t in tgt.items():
        if key not in present:
            absent.append(key)
        elif key not in shapes:  # an object where torch expects a tensor: it refuses it
            mismatched.append(Mismatch(key, (), t.shape))
        elif shapes_load(shapes[key], t.shape):
            loaded.append(key)
        else:
            mismatched.append(Mismatch(key, shapes[key], t.shape))
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
    return Compatibility(tuple(missing), tuple(unexpected), tuple(mismatched), tuple(loaded),
                         tuple(k for k in absent if k in fills), tuple(tied))


def auto_filled(target: TargetSignature, present: Collection[str],
                versions: Mapping[str, int | None] | None = None) -> tuple[str, ...]:
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
    return TargetSignature(spec, {}, {k: TargetTensor(_shape(v), str(getattr(v, "dtype", "")), "tensor")
                                      for k, v in state.items()})


def _shape(value: Any) -> tuple[int, ...]:
    if isinstance(value, tuple):
        return value
    return tuple(int(d) for d in value.shape)
