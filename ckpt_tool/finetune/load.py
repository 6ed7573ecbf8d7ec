"""The checkpoint's tensors after the migrate operations, loaded into the model and checked."""

from __future__ import annotations

from typing import Any

from ..model import Checkpoint, common_prefix, in_module
from ..render import shape_str
from ..values import torch_state_dict
from .options import FinetuneOptions
from .report import FAIL, PASS, Check, LoadReport, _some


def _migrated_state(ckpt: Checkpoint, opts: FinetuneOptions, model: Any) -> tuple[dict[str, Any], tuple[str, ...],
                                                                           tuple[str, ...]]:
    """The checkpoint's tensors after the migrate operations (a --plan file first, then the inline ones).

    Returns the state, the operations' descriptions, and the keys the plan leaves to the model's
    own initialisation (fill_missing, reinit_mismatched).
    """
    import torch

    from .. import plan as plan_mod
    from ..arch import signature_of

    ops = list(plan_mod.load_plan(opts.plan).operations) if opts.plan else []
    ops += [plan_mod.operation("strip_prefix", prefix=p) for p in opts.strip_prefix]
    ops += [plan_mod.operation("add_prefix", prefix=p) for p in opts.add_prefix]
    ops += [plan_mod.parse_rename(r) for r in opts.rename]
    ops += [plan_mod.operation("drop", prefix=p) for p in opts.drop]
    ops += list(opts.operations)
    state = plan_mod.initial_state(ckpt.tensors)
    if ops:
        state = plan_mod.apply(ops, state, signature_of(model)[0]).state
    refs = {k: e.ref for k, e in state.items()
            if e.source == plan_mod.CHECKPOINT and e.ref is not None and not e.transform}
    tensors = torch_state_dict(refs)
    tensors.update(_computed(state))
    for key, entry in state.items():
        if key in tensors and entry.dtype != entry.source_dtype:
            tensors[key] = tensors[key].to(getattr(torch, entry.dtype))
    initialised = tuple(k for k in state if k not in tensors)
    return tensors, tuple(op.describe() for op in ops), initialised


def _computed(state: dict[str, Any]) -> dict[str, Any]:
    """Adapted, copied and zeroed tensors (--adapt-input-conv, --grow-blocks...), computed as migrate writes them."""
    from ..adapt import computed_tensor
    from ..values import FileCache, to_torch

    with FileCache() as files:
        return {k: computed_tensor(e, lambda ref: to_torch(ref, files)) for k, e in state.items() if e.transform}


def _load_into(model: Any, state: dict[str, Any], heads: tuple[str, ...], operations: tuple[str, ...],
               initialised: tuple[str, ...] = ()) -> LoadReport:
    """Load what would load; report the rest as the compat engine (torch's strict-load rules) sees it.

    The state loaded is a plain dict with no ``_metadata``, so torch fills in every absent
    ``num_batches_tracked`` itself; keys the plan left to the model's initialisation count as present.
    """
    from ..arch import signature_from_model
    from ..compat import check

    model_state = model.state_dict()
    target = signature_from_model(model)
    shapes = {k: tuple(v.shape) for k, v in state.items()}
    shapes.update({k: tuple(model_state[k].shape) for k in initialised
                   if k in model_state and k not in shapes and hasattr(model_state[k], "shape")})
    compat = check(shapes, target, versions=None)
    bad = {m.key for m in compat.mismatched}
    usable = {k: v for k, v in state.items() if k in model_state and k not in bad}
    # filtered first, so torch reports nothing we have not already counted and raises no size mismatch
    model.load_state_dict(usable, strict=False)
    head_keys = tuple(k for k in model_state if any(in_module(k, h) for h in heads))
    return LoadReport(loaded=len(usable), model_keys=len(model_state), checkpoint_keys=len(state),
                      missing=compat.missing, unexpected=compat.unexpected, mismatched=compat.mismatched,
                      head_keys=head_keys, operations=operations, initialised=initialised,
                      missing_shapes={k: tuple(model_state[k].shape) for k in compat.missing
                                      if k in model_state and hasattr(model_state[k], "shape")},
                      unexpected_shapes={k: shapes[k] for k in compat.unexpected if k in shapes},
                      auto_filled=compat.auto_filled, tied=compat.tied)


def _load_check(load: LoadReport, strict: bool, ckpt: Checkpoint) -> Check:
    head = set(load.head_keys)
    missing = [k for k in load.missing if k not in head]
    mismatched = [m for m in load.mismatched if m.key not in head]
    # buffers such as num_batches_tracked are often absent from older checkpoints; they do not hold weights
    weight_missing = [k for k in missing if not k.endswith("num_batches_tracked")]
    summary = (f"{load.loaded}/{load.model_keys} model tensors loaded; {len(load.missing)} missing, "
               f"{len(load.unexpected)} unexpected, {len(load.mismatched)} mismatched")
    if head:
        layers = dict.fromkeys(k.rsplit(".", 1)[0] for k in load.head_keys)
        summary += f" (head {', '.join(layers)} replaced)"
    if load.initialised:
        summary += f"; {len(load.initialised)} left to the model's initialisation by the plan"
    problems: list[str] = []
    if weight_missing:
        problems.append("missing " + _some(weight_missing))
    if mismatched:
        problems.append("mismatched " + _some([f"{m.key} {shape_str(m.shape)} vs "
                                               f"{shape_str(m.target_shape)}" for m in mismatched]))
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

