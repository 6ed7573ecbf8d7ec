"""``diff(checkpoint, target)``: what ``load_state_dict`` would say, before anything is loaded, and how to fix it.

The target is an architecture's state-dict layout (:class:`~ckpt_tool.arch.TargetSignature`, cached on disk
so a warm run imports no torch) or another checkpoint. Statuses mirror ``load_state_dict(strict=False)``:
``missing`` and ``unexpected`` are its two lists, ``shape`` the keys it rejects for a size mismatch;
``dtype`` keys load (``copy_`` casts) but differ in dtype; ``auto`` keys are absent but torch fills them in
(BatchNorm's ``num_batches_tracked`` when the state dict carries no version for that module); ``tied``
keys are absent but tied to a present partner. The rule itself is :mod:`ckpt_tool.compat`'s.
"""

from __future__ import annotations

import math
import os
from collections import Counter
from collections.abc import Iterable
from dataclasses import replace
from typing import Any

from ..arch import TargetSignature, TargetTensor, parse_arch_args, target_signature
from ..bulk import fast_constructor, paused
from ..checkpoint import Checkpoint, Progress, TensorRef
from ..compat import Compatibility, check_checkpoint, signature_of_state
from ..errors import InputError, OutputError, UsageError
from ..plan import Plan, apply, initial_state, save_mapping
from ..text import some
from .fix import suggest_plan, with_shape_flow
from .report import AUTO, DTYPE, MATCHED, MISSING, SHAPE, TIED, UNEXPECTED, DiffCounts, DiffReport, DiffTarget, KeyDiff
from .rows import rows_of
from .shapeflow import shape_flow as target_flow
from .valuediff import with_values


@paused
def diff_paths(
    path: str,
    target_path: str | None = None,
    *,
    arch: str | None = None,
    arch_args: Iterable[str] | dict[str, Any] = (),
    key: str | None = None,
    target_key: str | None = None,
    values: bool = False,
    depth: int | None = None,
    show_all: bool = False,
    use_cache: bool = True,
    plan_out: str | None = None,
    progress: Progress | None = None,
    input_shape: tuple[int, ...] | None = None,
    map_out: str | None = None,
) -> DiffReport:
    """Open both sides, diff them and, with ``plan_out``, save the fix plan as JSON.

    Args:
        path: the checkpoint that would be loaded.
        target_path: a second checkpoint to compare against (exclusive with ``arch``).
        arch: a target architecture (``"vgg16"``, ``"pkg.mod:factory"``, ``"file.py:factory"``, ``"timm:NAME"``).
        arch_args: ``["num_classes=10"]`` or a dict of keyword arguments for the architecture.
        key, target_key: the nested state dict to use on each side.
        values: compare tensor values too (checkpoint against checkpoint only; streamed).
        depth: one table row per module prefix of this many components.
        show_all: keep matched rows in the table.
        use_cache: read and write the on-disk signature cache.
        plan_out: file to write the JSON plan to.
        input_shape: the dummy input of the shape flow (batch included); the architecture's default without it.
        map_out: file to write a proposed ``--map`` (keys paired by position) to; the command reads it.
        progress: with ``values``, called with ``(bytes compared now, bytes to compare)`` per tensor.

    Example:
        >>> report = diff_paths("tiny_cnn_10.pth", arch="my_models.py:tiny_cnn", arch_args=["num_classes=4"])
        >>> report.counts.shape_mismatches, report.plan.command
        (2, 'ckpt migrate tiny_cnn_10.pth --arch my_models.py:tiny_cnn --arch-arg num_classes=4 --reinit-mismatched -o ...')
    """
    if (target_path is None) == (arch is None):
        raise UsageError(
            "give a second checkpoint or --arch, not both" if arch else "give a second checkpoint or --arch"
        )
    args = dict(arch_args) if isinstance(arch_args, dict) else parse_arch_args(list(arch_args))
    if args and arch is None:
        raise UsageError("--arch-arg needs --arch")
    if target_key is not None and target_path is None:
        raise UsageError("--target-key needs a second checkpoint")
    if values and target_path is None:
        raise UsageError("--values compares two checkpoints; an --arch target has no values")
    if depth is not None and depth < 1:
        raise UsageError(f"--depth {depth}: must be 1 or more")
    for option, out in (("--plan-out", plan_out), ("--map-out", map_out)):
        if out is not None and os.path.abspath(out) == os.path.abspath(path):
            raise OutputError(f"{out}: {option} would overwrite the checkpoint")
    if input_shape is not None and arch is None:
        raise UsageError("--input-shape needs --arch (the shape flow runs the target architecture)")
    from ..reader import open_checkpoint

    source = open_checkpoint(path, key)
    target: DiffTarget
    if arch is not None:
        target = target_signature(arch, args, use_cache=use_cache)
    else:
        assert target_path is not None
        target = open_checkpoint(target_path, target_key)
    report = diff(
        source,
        target,
        values=values,
        depth=depth,
        show_all=show_all,
        progress=progress,
        input_shape=input_shape,
        map_file=map_out,
    )
    if isinstance(target, Checkpoint):
        from ..formats.hf_trainer import is_trainer_dir
        from ..optim_state import compare_optimizers
        from ..optim_state.trainer import trainer_optimizers

        # a Trainer directory's optimizer.pt is beside the weights, its ids in the Trainer's groups
        found = [
            trainer_optimizers(p, c) if p and is_trainer_dir(p) else None
            for p, c in ((path, source), (target_path, target))
        ]
        report = replace(report, optimizer=compare_optimizers(source, target, found_a=found[0], found_b=found[1]))
    if plan_out is not None:
        report.plan.plan.save(plan_out)
        report = replace(report, plan_path=plan_out)
    if map_out is not None and report.plan.alignment is not None:
        save_mapping(report.plan.alignment.mapping, map_out)
        report = replace(report, map_path=map_out)
    return report


def diff(
    source: Checkpoint,
    target: DiffTarget,
    *,
    values: bool = False,
    depth: int | None = None,
    show_all: bool = False,
    progress: Progress | None = None,
    input_shape: tuple[int, ...] | None = None,
    map_file: str | None = None,
    flow: bool = True,
) -> DiffReport:
    """Compare a checkpoint's state dict with a target's, key by key, and suggest a fix plan.

    With an architecture as the target (and ``flow``), its forward pass runs on the meta device with
    the planned state's shapes (:func:`~ckpt_tool.diff.shapeflow.shape_flow`, ``input_shape`` or the
    architecture's default input).
    """
    if not source.tensors:
        raise InputError(f"{source.path}: holds no tensors to compare (no state dict found)")
    signature = target if isinstance(target, TargetSignature) else _checkpoint_signature(target)
    tgt = signature.tensors
    compat = check_checkpoint(source, signature)
    keys = _key_diffs(source.tensors, signature, compat)
    if values:
        assert isinstance(target, Checkpoint)
        keys = with_values(keys, source.tensors, target.tensors, progress)
    counts = _counts(keys, source.tensors, tgt)
    loads = compat.loads
    rows, hidden = rows_of(keys, depth, show_all)
    if isinstance(target, TargetSignature):
        arch, arch_args, cache, name, kind, target_key = (
            target.spec,
            dict(target.arch_args),
            target.cache,
            target.spec,
            "arch",
            None,
        )
    else:
        arch, arch_args, cache, name, kind, target_key = (
            None,
            {},
            None,
            target.path,
            "checkpoint",
            target.state_path or None,
        )
    plan = suggest_plan(
        source,
        signature,
        arch=arch,
        arch_args=arch_args,
        optional=set(compat.auto_filled) | {a for a, _ in compat.tied},
        map_file=map_file,
    )
    shape_flow = None
    if flow and isinstance(target, TargetSignature):
        shape_flow = target_flow(
            target,
            state=_planned_shapes(source, plan.plan, target),
            input_shape=input_shape,
            use_cache=target.cache != "off",
        )
        plan = with_shape_flow(plan, shape_flow)
    notes = []
    if compat.auto_filled:
        notes.append(
            f"{len(compat.auto_filled)} num_batches_tracked buffers are not in the checkpoint under their "
            "target names; torch fills them in itself because the state dict records no module version "
            "for them"
        )
    if compat.tied:
        notes.append(
            f"{len(compat.tied)} tied keys are absent but their partner is present ("
            + some([f"{a} = {p}" for a, p in compat.tied])
            + "): loading the partner sets both (safetensors' load_model, "
            "transformers); for a plain load_state_dict(strict=True), `ckpt migrate --arch ... --fill-missing` "
            "into a .pth writes the alias from its partner (a .safetensors output records it as an alias "
            "instead: safetensors holds no shared tensors)"
        )
    return DiffReport(
        source=source.path,
        source_format=source.format,
        source_key=source.state_path or None,
        target=name,
        target_kind=kind,
        target_key=target_key,
        arch_args=arch_args,
        cache=cache,
        counts=counts,
        loads_strictly=loads,
        keys=tuple(keys),
        rows=tuple(rows),
        hidden_rows=hidden,
        depth=depth,
        values=values,
        plan=plan,
        notes=tuple(notes),
        shape_flow=shape_flow,
    )


def _planned_shapes(source: Checkpoint, plan: Plan, target: TargetSignature) -> dict[str, tuple[int, ...]]:
    """Key -> shape of the state the plan writes (the checkpoint's own shapes where it leaves a mismatch)."""
    try:
        applied = apply(plan.operations, initial_state(source.tensors), target)
    except UsageError:  # a plan that cannot apply as it stands: the target's own shapes
        return {}
    return {k: e.shape for k, e in applied.state.items()}


def _checkpoint_signature(target: Checkpoint) -> TargetSignature:
    if not target.tensors:
        raise InputError(f"{target.path}: holds no tensors to compare (no state dict found)")
    return signature_of_state(target.tensors, target.path)


_key_diff = fast_constructor(KeyDiff)  # every field, positionally (100,000 keys: a third of the time)


def _key_diffs(src: dict[str, TensorRef], target: TargetSignature, compat: Compatibility) -> list[KeyDiff]:
    status = {k: MISSING for k in compat.missing}
    status.update({m.key: SHAPE for m in compat.mismatched})
    status.update({k: AUTO for k in compat.auto_filled})
    status.update({a: TIED for a, _ in compat.tied})
    # an alias a safetensors file ckpt wrote records beside its partner: present, under the partner's bytes
    status.update({k: TIED for k in compat.loaded if k not in src})
    out: list[KeyDiff] = []
    add, get, new = out.append, status.get, _key_diff
    for key, t in target.tensors.items():
        s = src.get(key)
        if s is None:
            add(new(key, get(key, MISSING), None, None, t.shape, t.dtype, None, None))
        else:
            add(
                new(
                    key,
                    get(key, DTYPE if s.dtype != t.dtype else MATCHED),
                    s.shape,
                    s.dtype,
                    t.shape,
                    t.dtype,
                    None,
                    None,
                )
            )
    # an _extra_state the target requires: an object, not a tensor
    out.extend(KeyDiff(k, MISSING, None, None, (), "object") for k in compat.missing if k not in target.tensors)
    unexpected = set(compat.unexpected)
    out.extend(KeyDiff(k, UNEXPECTED, s.shape, s.dtype, None, None) for k, s in src.items() if k in unexpected)
    out.extend(KeyDiff(k, UNEXPECTED, (), "object", None, None) for k in compat.unexpected if k not in src)
    return out


def _counts(keys: list[KeyDiff], src: dict[str, TensorRef], tgt: dict[str, TargetTensor]) -> DiffCounts:
    by = {s: 0 for s in (MATCHED, DTYPE, SHAPE, MISSING, UNEXPECTED, AUTO, TIED)}
    by.update(Counter([k.status for k in keys]))
    compared = [k for k in keys if k.max_abs_diff is not None]
    changed = sum(1 for k in compared if k.max_abs_diff != 0) if compared else None
    return DiffCounts(
        source_keys=len(src),
        target_keys=len(tgt),
        matched=by[MATCHED] + by[DTYPE],
        missing=by[MISSING],
        unexpected=by[UNEXPECTED],
        shape_mismatches=by[SHAPE],
        dtype_differences=by[DTYPE],
        target_numel=sum(map(math.prod, [t.shape for t in tgt.values()])),
        filled_numel=sum(map(math.prod, [k.target_shape or () for k in keys if k.status in (MATCHED, DTYPE, TIED)])),
        auto_filled=by[AUTO],
        tied=by[TIED],
        changed=changed,
        unchanged=len(compared) - changed if changed is not None else None,
    )
