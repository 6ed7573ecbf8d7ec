"""The checkpoint's tensors after the migrate operations, loaded into the model and checked."""

from __future__ import annotations

from collections import OrderedDict
from typing import Any

from ..checkpoint import Checkpoint, common_prefix, in_module
from ..compat import ALL_CURRENT, module_versions
from ..text import shape_str
from ..values import torch_state_dict
from .options import FinetuneOptions
from .report import FAIL, PASS, Check, LoadReport, _some


def _migrated_state(
    ckpt: Checkpoint, opts: FinetuneOptions, model: Any
) -> tuple[dict[str, Any], tuple[str, ...], tuple[str, ...]]:
    """What ``torch.load`` of the file migrate would write gives: the state dict after the operations.

    The operations (a --plan file first, then the inline ones) rename and drop ``_extra_state``
    entries and ``_metadata`` along with the tensors, as ``ckpt migrate`` writes them. Returns the
    state (tensors and objects, ``_metadata`` on it as torch pickles it), the operations'
    descriptions, and the keys the plan leaves to the model's own initialisation (fill_missing,
    reinit_mismatched).
    """
    import torch

    from .. import plan as plan_mod
    from ..arch import signature_of
    from ..objects import carried_entries

    ops = list(plan_mod.load_plan(opts.plan).operations) if opts.plan else []
    ops += [plan_mod.operation("strip_prefix", prefix=p) for p in opts.strip_prefix]
    ops += [plan_mod.operation("add_prefix", prefix=p) for p in opts.add_prefix]
    ops += [plan_mod.parse_rename(r) for r in opts.rename]
    ops += [plan_mod.operation("drop", prefix=p) for p in opts.drop]
    ops += list(opts.operations)
    state = plan_mod.initial_state(ckpt.tensors)
    if ops:
        state = plan_mod.apply(ops, state, signature_of(model)[0], objects=tuple(ckpt.objects)).state
    refs = {
        k: e.ref for k, e in state.items() if e.source == plan_mod.CHECKPOINT and e.ref is not None and not e.transform
    }
    tensors = torch_state_dict(refs)
    tensors.update(_computed(state))
    for key, entry in state.items():
        if key in tensors and entry.dtype != entry.source_dtype:
            tensors[key] = tensors[key].to(getattr(torch, entry.dtype))
    initialised = tuple(k for k in state if k not in tensors)
    keys, metadata = carried_entries(ckpt, ops, state)
    out = _StateDict(tensors)
    out.update((keys[k], _torch_value(k, v, ckpt.path)) for k, v in ckpt.objects.items() if k in keys)
    if metadata is not None:
        out._metadata = OrderedDict((m, dict(v) if isinstance(v, dict) else v) for m, v in metadata.items())
    elif module_versions(ckpt) is ALL_CURRENT:
        # a pickled module: ``state_dict()`` of it records its classes' current versions, as the model's does
        out._metadata = OrderedDict(getattr(model.state_dict(), "_metadata", {}))
    return out, tuple(op.describe() for op in ops), initialised


class _StateDict(OrderedDict[str, Any]):
    """An ``OrderedDict`` that can carry ``_metadata``, as the one ``torch.load`` returns does."""

    _metadata: OrderedDict[str, Any]


def _torch_value(key: str, value: Any, path: str) -> Any:
    """A non-tensor entry (``_extra_state``) as ``torch.load(weights_only=True)`` gives it; tensors inside read too."""
    from ..errors import UsageError
    from ..formats.pickle_vm import PickledOrderedDict, PickledTensor
    from ..reader import tensor_ref

    if value is None or isinstance(value, (bool, int, float, str, bytes)):
        return value
    if isinstance(value, PickledTensor):
        return torch_state_dict({key: tensor_ref(key, value, path)})[key]
    if isinstance(value, tuple):
        return tuple(_torch_value(key, v, path) for v in value)
    if isinstance(value, list):
        return [_torch_value(key, v, path) for v in value]
    if isinstance(value, dict):
        items = ((_torch_value(key, k, path), _torch_value(key, v, path)) for k, v in value.items())
        return OrderedDict(items) if isinstance(value, PickledOrderedDict) else dict(items)
    raise UsageError(
        f"state-dict entry {key!r} holds {type(value).__name__}, which ckpt does not build; leave it "
        f"out with --drop {key}"
    )


def _computed(state: dict[str, Any]) -> dict[str, Any]:
    """Adapted, copied and zeroed tensors (--adapt-input-conv, --grow-blocks...), computed as migrate writes them."""
    from ..adapt import computed_tensor
    from ..values import FileCache, to_torch

    with FileCache() as files:
        return {k: computed_tensor(e, lambda ref: to_torch(ref, files)) for k, e in state.items() if e.transform}


def _load_into(
    model: Any,
    state: dict[str, Any],
    heads: tuple[str, ...],
    operations: tuple[str, ...],
    initialised: tuple[str, ...] = (),
) -> LoadReport:
    """``model.load_state_dict(state, strict=False)`` of all that torch accepts; the report is torch's answer.

    ``state`` is a state dict as ``torch.load`` returns it: tensors, ``_extra_state`` objects (they
    reach ``set_extra_state``) and ``_metadata`` (module versions decide torch's
    ``num_batches_tracked`` fill-ins; a plain dict without it gets them all). Only the keys whose
    shape torch would reject (the compat engine, torch's shape rule) are held back, because torch
    raises on them even when not strict; an absent alias of a tied weight takes its partner's
    tensor, as safetensors' ``load_model`` re-ties it; keys the plan left to the model's
    initialisation keep the model's own values.
    """
    import torch

    from ..arch import signature_from_model
    from ..compat import check

    model_state = model.state_dict()
    target = signature_from_model(model)
    objects = [k for k, v in state.items() if not isinstance(v, torch.Tensor)]
    shapes: dict[str, Any] = {k: (() if k in objects else tuple(v.shape)) for k, v in state.items()}
    shapes.update(
        {
            k: tuple(model_state[k].shape)
            for k in initialised
            if k in model_state and k not in shapes and hasattr(model_state[k], "shape")
        }
    )
    metadata = getattr(state, "_metadata", None)
    versions = (
        None
        if metadata is None
        else {m: v.get("version") if isinstance(v, dict) else None for m, v in metadata.items()}
    )
    compat = check(shapes, target, versions=versions, objects=objects)
    bad = {m.key for m in compat.mismatched}
    usable = _StateDict((k, v) for k, v in state.items() if k not in bad)
    usable.update({k: model_state[k] for k in initialised if k in model_state and k not in usable})
    usable.update({alias: usable[partner] for alias, partner in compat.tied})
    if metadata is not None:
        usable._metadata = metadata
    # torch raises no size mismatch: the keys it would reject were held back (and are reported as mismatched)
    result = model.load_state_dict(usable, strict=False)
    missing = tuple(k for k in result.missing_keys if k not in bad)
    from_checkpoint = [k for k in state if k in model_state and k not in bad]
    head_keys = tuple(k for k in model_state if any(in_module(k, h) for h in heads))
    return LoadReport(
        loaded=len(from_checkpoint),
        model_keys=len(model_state),
        checkpoint_keys=len(state),
        missing=missing,
        unexpected=tuple(result.unexpected_keys),
        mismatched=compat.mismatched,
        head_keys=head_keys,
        operations=operations,
        initialised=initialised,
        missing_shapes={
            k: tuple(model_state[k].shape) for k in missing if k in model_state and hasattr(model_state[k], "shape")
        },
        unexpected_shapes={k: shapes[k] for k in result.unexpected_keys if k in shapes and k not in objects},
        auto_filled=compat.auto_filled,
        tied=compat.tied,
    )


def _load_check(load: LoadReport, strict: bool, ckpt: Checkpoint) -> Check:
    head = set(load.head_keys)
    missing = [k for k in load.missing if k not in head]
    mismatched = [m for m in load.mismatched if m.key not in head]
    # buffers such as num_batches_tracked are often absent from older checkpoints; they do not hold weights
    weight_missing = [k for k in missing if not k.endswith("num_batches_tracked")]
    summary = (
        f"{load.loaded}/{load.model_keys} model tensors loaded; {len(load.missing)} missing, "
        f"{len(load.unexpected)} unexpected, {len(load.mismatched)} mismatched"
    )
    if head:
        layers = dict.fromkeys(k.rsplit(".", 1)[0] for k in load.head_keys)
        summary += f" (head {', '.join(layers)} replaced)"
    if load.initialised:
        summary += f"; {len(load.initialised)} left to the model's initialisation by the plan"
    problems: list[str] = []
    if weight_missing:
        problems.append("missing " + _some(weight_missing))
    if mismatched:
        problems.append(
            "mismatched " + _some([f"{m.key} {shape_str(m.shape)} vs {shape_str(m.target_shape)}" for m in mismatched])
        )
    if strict and (missing or load.unexpected):
        problems.append("--strict: " + _some(missing + list(load.unexpected)))
    if load.loaded == 0 and load.model_keys:
        prefix = common_prefix(list(ckpt.tensors))
        hint = f"; try --strip-prefix {prefix}" if prefix else ""
        return Check("weights loaded", FAIL, f"nothing loaded: {summary}{hint}")
    if problems:
        return Check("weights loaded", FAIL, f"{summary}; " + "; ".join(problems))
    if load.unexpected:
        summary += f"; ignored {_some(list(load.unexpected))}"
    return Check("weights loaded", PASS, summary)
