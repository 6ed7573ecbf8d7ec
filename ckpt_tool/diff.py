"""``diff(checkpoint, target)``: what ``load_state_dict`` would say, before anything is loaded, and how to fix it.

The target is an architecture's state-dict layout (:class:`~ckpt_tool.arch.TargetSignature`, cached on disk
so a warm run imports no torch) or another checkpoint. Statuses mirror ``load_state_dict(strict=False)``:
``missing`` and ``unexpected`` are its two lists, ``shape`` the keys it rejects for a size mismatch;
``dtype`` keys load (``copy_`` casts) but differ in dtype; ``auto`` keys are absent but torch fills them in
(BatchNorm's ``num_batches_tracked`` when the state dict carries no version for that module).
"""

from __future__ import annotations

import math
import os
import re
import shlex
from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from typing import Any

from .arch import TargetSignature, TargetTensor, parse_arch_args, target_signature
from .errors import InputError, OutputError, UsageError
from .model import Checkpoint, Progress, TensorRef, common_prefix, in_module, itemsize, numel
from .render import some

MATCHED, DTYPE, SHAPE, MISSING, UNEXPECTED, MIXED = "matched", "dtype", "shape", "missing", "unexpected", "mixed"
# not in the checkpoint, but torch fills it in itself (BatchNorm's num_batches_tracked without version metadata)
AUTO = "auto"
# elements compared per step with --values: bounded memory whatever the tensor size
VALUE_CHUNK_ELEMENTS = 1 << 20
# more drop prefixes than this and the plan says --drop-unexpected instead
MAX_DROP_PREFIXES = 4


@dataclass(frozen=True)
class KeyDiff:
    """One key of either side; shapes and dtypes are ``None`` on the side that lacks the key."""

    key: str
    status: str
    source_shape: tuple[int, ...] | None
    source_dtype: str | None
    target_shape: tuple[int, ...] | None
    target_dtype: str | None
    max_abs_diff: float | None = None
    rel_change: float | None = None


@dataclass(frozen=True)
class Row:
    """A table row: one key, a folded run of keys (``layer1.{0..1}.conv1.weight``) or, with ``depth``, a module."""

    name: str
    status: str
    keys: int
    source_shape: tuple[int, ...] | None = None
    source_dtype: str | None = None
    target_shape: tuple[int, ...] | None = None
    target_dtype: str | None = None
    source_numel: int = 0
    target_numel: int = 0
    statuses: dict[str, int] = field(default_factory=dict)
    max_abs_diff: float | None = None
    rel_change: float | None = None


@dataclass(frozen=True)
class DiffCounts:
    """``matched`` counts keys on both sides whose shapes agree (dtype differences included, they load)."""

    source_keys: int
    target_keys: int
    matched: int
    missing: int
    unexpected: int
    shape_mismatches: int
    dtype_differences: int
    target_numel: int
    filled_numel: int
    auto_filled: int = 0
    changed: int | None = None
    unchanged: int | None = None

    @property
    def filled_share(self) -> float:
        """Share of the target's elements the checkpoint would fill (what ``strict=False`` really loads)."""
        return self.filled_numel / self.target_numel if self.target_numel else 1.0

    def to_json(self) -> dict[str, Any]:
        out = {name: getattr(self, name) for name in self.__dataclass_fields__}
        out["filled_share"] = round(self.filled_share, 6)
        return out


@dataclass(frozen=True)
class PlanStep:
    operation: dict[str, Any]
    reason: str
    keys: int


@dataclass(frozen=True)
class FixPlan:
    """Operations that make the checkpoint load strictly, as ``ckpt migrate`` flags and as a plan document.

    ``resolves`` is whether the operations, simulated on the keys, leave nothing that would fail a strict
    load; ``notes`` says what the plan cannot decide (ambiguous renames, values it has no source for).
    """

    steps: tuple[PlanStep, ...]
    document: dict[str, Any]
    command: str | None
    resolves: bool
    notes: tuple[str, ...] = ()


@dataclass(frozen=True)
class DiffReport:
    source: str
    source_format: str
    source_key: str | None
    target: str
    target_kind: str  # "arch" or "checkpoint"
    target_key: str | None
    arch_args: dict[str, Any]
    cache: str | None
    counts: DiffCounts
    loads_strictly: bool
    keys: tuple[KeyDiff, ...]
    rows: tuple[Row, ...]
    hidden_rows: int
    depth: int | None
    values: bool
    plan: FixPlan
    plan_path: str | None = None
    notes: tuple[str, ...] = ()


Target = TargetSignature | Checkpoint


def diff_paths(path: str, target_path: str | None = None, *, arch: str | None = None,
               arch_args: Iterable[str] | dict[str, Any] = (), key: str | None = None,
               target_key: str | None = None, values: bool = False, depth: int | None = None,
               show_all: bool = False, use_cache: bool = True, plan_out: str | None = None,
               progress: Progress | None = None) -> DiffReport:
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
        progress: with ``values``, called with ``(bytes compared now, bytes to compare)`` per tensor.

    Example:
        >>> report = diff_paths("tiny_cnn_10.pth", arch="my_models.py:tiny_cnn", arch_args=["num_classes=4"])
        >>> report.counts.shape_mismatches, report.plan.command
        (2, 'ckpt migrate tiny_cnn_10.pth --arch my_models.py:tiny_cnn --arch-arg num_classes=4 --reinit-mismatched -o ...')
    """
    if (target_path is None) == (arch is None):
        raise UsageError("give a second checkpoint or --arch, not both" if arch else "give a second checkpoint or --arch")
    args = dict(arch_args) if isinstance(arch_args, dict) else parse_arch_args(list(arch_args))
    if args and arch is None:
        raise UsageError("--arch-arg needs --arch")
    if target_key is not None and target_path is None:
        raise UsageError("--target-key needs a second checkpoint")
    if values and target_path is None:
        raise UsageError("--values compares two checkpoints; an --arch target has no values")
    if depth is not None and depth < 1:
        raise UsageError(f"--depth {depth}: must be 1 or more")
    if plan_out is not None and os.path.abspath(plan_out) == os.path.abspath(path):
        raise OutputError(f"{plan_out}: --plan-out would overwrite the checkpoint")
    from .reader import open_checkpoint

    source = open_checkpoint(path, key)
    target: Target
    if arch is not None:
        target = target_signature(arch, args, use_cache=use_cache)
    else:
        assert target_path is not None
        target = open_checkpoint(target_path, target_key)
    report = diff(source, target, values=values, depth=depth, show_all=show_all, progress=progress)
    if plan_out is not None:
        write_plan(report.plan.document, plan_out)
        report = replace(report, plan_path=plan_out)
    return report


def diff(source: Checkpoint, target: Target, *, values: bool = False, depth: int | None = None,
         show_all: bool = False, progress: Progress | None = None) -> DiffReport:
    """Compare a checkpoint's state dict with a target's, key by key, and suggest a fix plan."""
    if not source.tensors:
        raise InputError(f"{source.path}: holds no tensors to compare (no state dict found)")
    tgt = _target_tensors(target)
    fills = torch_fills(source, target) if isinstance(target, TargetSignature) else set()
    keys = _key_diffs(source.tensors, tgt, fills)
    if values:
        assert isinstance(target, Checkpoint)
        keys = _with_values(keys, source.tensors, target.tensors, progress)
    counts = _counts(keys, source.tensors, tgt)
    loads = counts.missing == counts.unexpected == counts.shape_mismatches == 0
    rows, hidden = _rows(keys, depth, show_all)
    if isinstance(target, TargetSignature):
        arch, arch_args, cache, name, kind, target_key = target.spec, dict(target.arch_args), target.cache, \
            target.spec, "arch", None
    else:
        arch, arch_args, cache, name, kind, target_key = None, {}, None, target.path, "checkpoint", \
            target.state_path or None
    plan = suggest_plan(source, tgt, arch=arch, arch_args=arch_args, optional=fills)
    notes = []
    if fills:
        notes.append(f"{len(fills)} num_batches_tracked buffers are not in the checkpoint under their target names; "
                     "torch fills them in itself because the state dict records no module version for them")
    return DiffReport(
        source=source.path, source_format=source.format, source_key=source.state_path or None,
        target=name, target_kind=kind, target_key=target_key, arch_args=arch_args, cache=cache, counts=counts, loads_strictly=loads, keys=tuple(keys),
        rows=tuple(rows), hidden_rows=hidden, depth=depth, values=values, plan=plan, notes=tuple(notes),
    )


def _target_tensors(target: Target) -> dict[str, TargetTensor]:
    if isinstance(target, TargetSignature):
        return target.tensors
    if not target.tensors:
        raise InputError(f"{target.path}: holds no tensors to compare (no state dict found)")
    return {k: TargetTensor(t.shape, t.dtype, "tensor") for k, t in target.tensors.items()}


def shapes_load(source: tuple[int, ...], target: tuple[int, ...]) -> bool:
    """Whether ``load_state_dict`` accepts a tensor of shape ``source`` for a parameter of shape ``target``.

    Besides equal shapes, torch still loads a 1-element vector into a 0-d parameter (the 0.3 -> 0.4
    compatibility rule in ``Module._load_from_state_dict``).
    """
    return source == target or (target == () and source == (1,))


def torch_fills(source: Checkpoint, target: TargetSignature) -> set[str]:
    """Target keys the checkpoint lacks that ``load_state_dict`` adds itself, so does not call missing.

    ``_NormBase._load_from_state_dict`` inserts ``num_batches_tracked`` when the state dict's
    ``_metadata`` gives the module no version >= 2: safetensors files and plain dicts carry no
    metadata, and a ``module.``-prefixed one has it under other names.
    """
    versions = _module_versions(source)
    out = set()
    for key in target.auto_filled:
        version = versions.get(key.rpartition(".")[0]) if versions is not None else 2
        if key not in source.tensors and (version is None or version < 2):
            out.add(key)
    return out


def _module_versions(source: Checkpoint) -> dict[str, int | None] | None:
    """Module path -> version from the state dict's pickled ``_metadata``; ``None`` means "all current"."""
    from .formats.pickle_vm import PickledOrderedDict, Placeholder
    from .reader import resolve_key

    if source.root is None:  # safetensors / sharded: a plain dict of tensors, no metadata at all
        return {}
    obj = resolve_key(source.root, source.state_path, source.path, [])[1] if source.state_path else source.root
    if isinstance(obj, Placeholder):
        # a pickled module tree: state_dict() of a current module records current versions
        return None if obj.dictitems is None or not isinstance(obj.dictitems, PickledOrderedDict) else \
            _versions_of(obj.dictitems)
    return _versions_of(obj) if isinstance(obj, dict) else {}


def _versions_of(obj: dict[Any, Any]) -> dict[str, int | None]:
    from .formats.pickle_vm import PickledOrderedDict

    attributes = obj.attributes if isinstance(obj, PickledOrderedDict) else None
    metadata = (attributes or {}).get("_metadata")
    if not isinstance(metadata, dict):
        return {}
    return {str(m): v.get("version") if isinstance(v, dict) and isinstance(v.get("version"), int) else None
            for m, v in metadata.items()}


def _key_diffs(src: dict[str, TensorRef], tgt: dict[str, TargetTensor], fills: set[str]) -> list[KeyDiff]:
    out: list[KeyDiff] = []
    for key, t in tgt.items():
        s = src.get(key)
        if s is None:
            out.append(KeyDiff(key, AUTO if key in fills else MISSING, None, None, t.shape, t.dtype))
            continue
        status = SHAPE if not shapes_load(s.shape, t.shape) else DTYPE if s.dtype != t.dtype else MATCHED
        out.append(KeyDiff(key, status, s.shape, s.dtype, t.shape, t.dtype))
    out.extend(KeyDiff(k, UNEXPECTED, s.shape, s.dtype, None, None) for k, s in src.items() if k not in tgt)
    return out


def _counts(keys: list[KeyDiff], src: dict[str, TensorRef], tgt: dict[str, TargetTensor]) -> DiffCounts:
    by = {s: 0 for s in (MATCHED, DTYPE, SHAPE, MISSING, UNEXPECTED, AUTO)}
    for k in keys:
        by[k.status] += 1
    compared = [k for k in keys if k.max_abs_diff is not None]
    changed = sum(1 for k in compared if k.max_abs_diff != 0) if compared else None
    return DiffCounts(
        source_keys=len(src), target_keys=len(tgt), matched=by[MATCHED] + by[DTYPE], missing=by[MISSING],
        unexpected=by[UNEXPECTED], shape_mismatches=by[SHAPE], dtype_differences=by[DTYPE],
        target_numel=sum(numel(t.shape) for t in tgt.values()),
        filled_numel=sum(numel(k.target_shape or ()) for k in keys if k.status in (MATCHED, DTYPE)),
        auto_filled=by[AUTO],
        changed=changed, unchanged=len(compared) - changed if changed is not None else None,
    )


# --- values ------------------------------------------------------------------------------------------------


def _with_values(keys: list[KeyDiff], src: dict[str, TensorRef], tgt: dict[str, TensorRef],
                 progress: Progress | None = None) -> list[KeyDiff]:
    from .values import FileCache

    def comparable(k: KeyDiff) -> bool:
        return k.status in (MATCHED, DTYPE) and src[k.key].shape == tgt[k.key].shape

    total = sum(src[k.key].nbytes + tgt[k.key].nbytes for k in keys if comparable(k))
    out = []
    with FileCache() as files:
        for k in keys:
            if comparable(k):
                max_abs, rel = compare_values(src[k.key], tgt[k.key], files)
                k = replace(k, max_abs_diff=max_abs, rel_change=rel)
                if progress is not None:
                    progress(src[k.key].nbytes + tgt[k.key].nbytes, total)
            out.append(k)
    return out


def compare_values(a: TensorRef, b: TensorRef, files: Any) -> tuple[float, float]:
    """``(max |a - b|, ||a - b|| / ||a||)`` of two same-shape tensors, streamed chunk by chunk.

    NaNs in the same place on both sides count as equal; a NaN on one side only makes both figures NaN.
    """
    import numpy as np

    from .values import compare_composite, iter_raw_chunks, to_numpy

    if a.kind != "dense" or b.kind != "dense":
        return compare_composite(a, b, files)  # quantized by their dequantized values, sparse by dense ones
    n = a.numel
    if n == 0:
        return 0.0, 0.0
    # strided views stream in blocks of whole rows, which need not line up with the other side's
    # chunks, so then both sides are read as one chunk
    elements = min(n, VALUE_CHUNK_ELEMENTS) if a.is_contiguous and b.is_contiguous else n
    max_abs, diff_sq, ref_sq = 0.0, 0.0, 0.0
    chunks = zip(iter_raw_chunks(a, files, elements * itemsize(a.dtype)),
                 iter_raw_chunks(b, files, elements * itemsize(b.dtype)), strict=True)
    for raw_a, raw_b in chunks:
        x, y = _wide(to_numpy(raw_a, a.dtype)), _wide(to_numpy(raw_b, b.dtype))
        d = np.abs(x - y)
        both_nan = np.isnan(x) & np.isnan(y)
        if both_nan.any():
            d[both_nan] = 0.0
            x = np.where(both_nan, 0.0, x)
        max_abs = max(max_abs, float(d.max())) if not math.isnan(max_abs) else max_abs
        diff_sq += float(np.square(d).sum())
        ref_sq += float(np.square(np.abs(x)).sum())
    if math.isnan(diff_sq):
        return math.nan, math.nan
    rel = math.sqrt(diff_sq / ref_sq) if ref_sq > 0 else (0.0 if diff_sq == 0 else math.inf)
    return max_abs, rel


def _wide(arr: Any) -> Any:
    import numpy as np

    return arr.astype(np.complex128 if arr.dtype.kind == "c" else np.float64)


# --- rows: --depth, folding, hiding ----------------------------------------------------------------------


def _rows(keys: list[KeyDiff], depth: int | None, show_all: bool) -> tuple[list[Row], int]:
    rows = _module_rows(keys, depth) if depth else [_key_row(k) for k in keys]
    shown = [r for r in rows if show_all or not _is_quiet(r)]
    folded = fold_rows(shown)
    return (folded if depth else fold_leaves(folded)), len(rows) - len(shown)


def _is_quiet(row: Row) -> bool:
    """Matched rows (with --values: matched and unchanged) are hidden unless --all."""
    if row.status == AUTO:
        return True
    if row.status != MATCHED:
        return False
    return row.max_abs_diff is None or row.max_abs_diff == 0


def _key_row(k: KeyDiff) -> Row:
    return Row(k.key, k.status, 1, k.source_shape, k.source_dtype, k.target_shape, k.target_dtype,
               numel(k.source_shape) if k.source_shape is not None else 0,
               numel(k.target_shape) if k.target_shape is not None else 0,
               max_abs_diff=k.max_abs_diff, rel_change=k.rel_change)


def _module_rows(keys: list[KeyDiff], depth: int) -> list[Row]:
    groups: dict[str, list[KeyDiff]] = {}
    for k in keys:
        module = k.key.rpartition(".")[0]
        groups.setdefault(".".join(module.split(".")[:depth]) if module else "(top level)", []).append(k)
    rows = []
    for name, members in groups.items():
        statuses: dict[str, int] = {}
        for k in members:
            statuses[k.status] = statuses.get(k.status, 0) + 1
        changed = [k.max_abs_diff for k in members if k.max_abs_diff is not None]
        rows.append(Row(
            name, next(iter(statuses)) if len(statuses) == 1 else MIXED, len(members),
            source_numel=sum(numel(k.source_shape) for k in members if k.source_shape is not None),
            target_numel=sum(numel(k.target_shape) for k in members if k.target_shape is not None),
            statuses=statuses, max_abs_diff=max(changed) if changed else None,
        ))
    return rows


def fold_rows(rows: list[Row]) -> list[Row]:
    """Fold rows that differ only in numeric key components: ``layer1.{0..1}.conv1.weight``, ``features.{0,2,5}.weight``.

    Rows fold only when everything else (status, shapes, dtypes, counts) is equal; rows with compared
    values never fold (each has its own figures).
    """
    groups: dict[tuple[Any, ...], list[tuple[int, tuple[int, ...]]]] = {}
    for i, row in enumerate(rows):
        parts = row.name.split(".")
        numbers = tuple(int(p) for p in parts if _is_index(p))
        if not numbers or row.max_abs_diff is not None:
            groups[("row", i)] = [(i, ())]
            continue
        template = tuple("#" if _is_index(p) else p for p in parts)
        groups.setdefault((template, _fold_signature(row), row.source_numel, row.target_numel), []).append((i, numbers))
    out: list[tuple[int, Row]] = []
    for members in groups.values():
        first = rows[members[0][0]]
        if len(members) == 1:
            out.append((members[0][0], first))
            continue
        width = len(members[0][1])
        # fold along the numeric position that leaves the fewest rows
        position = min(range(width), key=lambda p: len({n[:p] + n[p + 1:] for _, n in members}))
        runs: dict[tuple[int, ...], list[tuple[int, tuple[int, ...]]]] = {}
        for i, n in members:
            runs.setdefault(n[:position] + n[position + 1:], []).append((i, n))
        for run in runs.values():
            head = rows[run[0][0]]
            if len(run) == 1:
                out.append((run[0][0], head))
                continue
            name = _fold_name(head.name, position, [n[position] for _, n in run])
            out.append((run[0][0], replace(head, name=name, keys=sum(rows[i].keys for i, _ in run),
                                           source_numel=sum(rows[i].source_numel for i, _ in run),
                                           target_numel=sum(rows[i].target_numel for i, _ in run),
                                           statuses=_sum_statuses(rows[i] for i, _ in run))))
    return [row for _, row in sorted(out, key=lambda item: item[0])]


def fold_leaves(rows: list[Row]) -> list[Row]:
    """Fold rows of one module that differ only in the last name: ``bn1.{weight,bias,running_mean}``."""
    groups: dict[tuple[Any, ...], list[int]] = {}
    for i, row in enumerate(rows):
        parent = row.name.rpartition(".")[0]
        if not parent or row.max_abs_diff is not None:
            groups[("row", i)] = [i]
        else:
            groups.setdefault((parent, _fold_signature(row)), []).append(i)
    out: list[tuple[int, Row]] = []
    for members in groups.values():
        head = rows[members[0]]
        if len(members) == 1:
            out.append((members[0], head))
            continue
        leaves = ",".join(rows[i].name.rpartition(".")[2] for i in members)
        out.append((members[0], replace(
            head, name=f"{head.name.rpartition('.')[0]}.{{{leaves}}}", keys=sum(rows[i].keys for i in members),
            source_numel=sum(rows[i].source_numel for i in members),
            target_numel=sum(rows[i].target_numel for i in members))))
    return [row for _, row in sorted(out, key=lambda item: item[0])]


def _fold_signature(row: Row) -> tuple[Any, ...]:
    return (row.status, row.source_shape, row.source_dtype, row.target_shape, row.target_dtype,
            tuple(sorted(row.statuses.items())))


def _is_index(part: str) -> bool:
    return part.isdigit() and (part == "0" or not part.startswith("0"))


def _sum_statuses(rows: Iterable[Row]) -> dict[str, int]:
    total: dict[str, int] = {}
    for row in rows:
        for status, n in row.statuses.items():
            total[status] = total.get(status, 0) + n
    return total


def _fold_name(name: str, position: int, numbers: list[int]) -> str:
    parts = name.split(".")
    index_positions = [j for j, p in enumerate(parts) if _is_index(p)]
    parts[index_positions[position]] = "{" + format_indices(numbers) + "}"
    return ".".join(parts)


def format_indices(numbers: Iterable[int]) -> str:
    """``[0, 1, 2, 5, 7, 8]`` -> ``"0..2,5,7..8"``."""
    values = sorted(set(numbers))
    spans: list[str] = []
    start = prev = values[0]
    for v in [*values[1:], None]:
        if v is not None and v == prev + 1:
            prev = v
            continue
        spans.append(str(start) if start == prev else f"{start}..{prev}")
        if v is not None:
            start = prev = v
    return ",".join(spans)


# --- the fix plan ------------------------------------------------------------------------------------------


def suggest_plan(source: Checkpoint, target: dict[str, TargetTensor], *, arch: str | None,
                 arch_args: dict[str, Any], optional: set[str] | frozenset[str] = frozenset()) -> FixPlan:
    """The ``ckpt migrate`` operations that make ``source`` load strictly into ``target``, with reasons.

    Prefixes first (``module.``, ``_orig_mod.``, ``backbone.``...), then renames of whole modules whose
    keys and shapes match one to one in order, then drops, then (with an architecture to take values
    from) ``fill_missing`` and ``reinit_mismatched``. ``optional`` target keys may stay absent (torch fills them).
    """
    shapes = {k: t.shape for k, t in source.tensors.items()}
    tgt = {k: t.shape for k, t in target.items()}
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
    missing = [k for k in tgt if k not in current and k not in optional]
    mismatched = [k for k in tgt if k in current and not shapes_load(current[k], tgt[k])]
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
            share = sum(numel(tgt[k]) for k in mismatched) / max(1, sum(numel(s) for s in tgt.values()))
            if share > 0.5:
                notes.append(f"re-initialising {share:.0%} of the target's elements: is this the right architecture?")
        else:
            notes.append(f"{len(mismatched)} keys differ in shape ({some(mismatched)}); only --arch can re-initialise them")
    # drops cover every unexpected key; what is missing or mismatched needs a model to take values from
    resolves = arch is not None or not (missing or mismatched)
    operations = [s.operation for s in steps]
    document = {"version": 1, "source": source.path, "key": source.state_path or None, "arch": arch,
                "arch_args": dict(arch_args), "operations": operations}
    command = migrate_command(document) if operations else None
    return FixPlan(tuple(steps), document, command, resolves, tuple(notes))


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
        if [p for p in o if _is_index(p)] == [p for p in n if _is_index(p)] and any(_is_index(p) for p in o):
            families.setdefault((tuple("#" if _is_index(p) else p for p in o),
                                 tuple("#" if _is_index(p) else p for p in n)), []).append((old, new))
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


def migrate_command(document: dict[str, Any], output: str | None = None) -> str:
    """The ``ckpt migrate`` command line that applies a plan document, flag for flag."""
    source = document["source"]
    argv = ["ckpt", "migrate", source]
    if document.get("key"):
        argv += ["--key", document["key"]]
    if document.get("arch"):
        argv += ["--arch", document["arch"]]
        for name, value in sorted(document.get("arch_args", {}).items()):
            argv += ["--arch-arg", f"{name}={_arch_value(value)}"]
    for op in document["operations"]:
        flag = "--" + op["op"].replace("_", "-")
        if "prefix" in op:
            argv += [flag, op["prefix"]]
        elif op["op"] == "rename":
            argv += [flag, f"{op['pattern']}={op['replacement']}"]
        elif op["op"] in ("keep", "exclude"):
            argv += [flag, op["pattern"]]
        elif op["op"] == "cast":
            argv += ["--dtype", op["dtype"]]
        else:
            argv.append(flag)
    argv += ["-o", output or _fixed_name(source)]
    return " ".join(shlex.quote(a) for a in argv)


def _arch_value(value: Any) -> str:
    """How to write an --arch-arg value so that ``parse_arch_args`` reads it back as the same value."""
    if isinstance(value, str):
        return value if parse_arch_args([f"x={value}"])["x"] == value else repr(value)
    return repr(value)


def _fixed_name(source: str) -> str:
    base = source[: -len(".index.json")] if source.endswith(".index.json") else source.rstrip("/")
    stem, ext = os.path.splitext(base)
    return f"{stem}.fixed{ext if ext in ('.pth', '.pt', '.bin', '.ckpt', '.safetensors') else '.pth'}"


def write_plan(document: dict[str, Any], path: str) -> None:
    """Write a plan document as JSON, atomically (a temp file renamed over ``path``)."""
    import json
    import tempfile

    directory = os.path.dirname(os.path.abspath(path))
    try:
        fd, tmp = tempfile.mkstemp(prefix=".plan-", suffix=".json", dir=directory)
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                json.dump(document, f, indent=2)
                f.write("\n")
            os.replace(tmp, path)
        except BaseException:
            os.unlink(tmp)
            raise
    except OSError as exc:
        raise OutputError(f"{path}: cannot write the plan ({exc.strerror or exc})") from None
