"""``inspect``: what a checkpoint holds, as a :class:`InspectReport`."""

from __future__ import annotations

import functools
import math
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from .bulk import fast_constructor, paused
from .checkpoint import (
    BUFFER_NAMES,
    DENSE,
    DTENSOR_SHARD,
    DTYPES,
    QUANTIZED,
    SPARSE_KINDS,
    Candidate,
    Checkpoint,
    Progress,
    TensorRef,
    common_prefix,
    contiguous_strides,
)
from .errors import UsageError
from .formats.dcp import chunk_summary
from .formats.hf_trainer import is_trainer_dir
from .reader import open_checkpoint, packed_params, summarize
from .text import grouped_notes
from .values import FileCache, TensorStats, has_bytes, tensor_stats

if TYPE_CHECKING:
    from .optim_state import OptimizerSummary


# slots: 100,000 rows take a third of the memory of dicts. The fields are declared in name order:
# that is the order of the sorted JSON, in which orjson writes a long listing of rows by itself
# (render.dumps), without a call back into Python per row
@dataclass(frozen=True, slots=True, kw_only=True)
class TensorRow:
    contiguous: bool = True
    # what makes a composite up (kind: dense, sparse_coo/sparse_csr/..., quantized or dtensor_shard)
    detail: str = ""
    dtype: str
    kind: str = "dense"
    name: str
    nbytes: int
    note: str = ""  # how it was read
    offset: int | None = None
    parameters: int
    shape: tuple[int, ...]
    shared_with: tuple[str, ...] = ()
    stats: TensorStats | None = None
    storage: str = ""
    stride: tuple[int, ...] = ()


@dataclass(frozen=True)
class ModuleRow:
    """Tensors rolled up under one module prefix (``--depth``)."""

    name: str
    tensors: int
    parameters: int
    nbytes: int
    dtypes: tuple[str, ...]


@dataclass(frozen=True)
class InspectReport:
    """What ``inspect`` shows. ``parameters`` counts the values (elements) of every tensor, buffers
    included (the name is kept for the JSON's readers; the table says "values"): a tied alias that
    views the same values as its partner is not counted again, as ``model.parameters()`` does not.
    ``buffers`` is the part of it in tensors that are buffers by name (BatchNorm's ``running_mean``,
    ``running_var``, ``num_batches_tracked``). ``tensor_bytes`` counts a storage that several
    tensors view once."""

    path: str
    format: str
    file_size: int
    tensors: int
    parameters: int
    tensor_bytes: int
    bytes_by_dtype: dict[str, int]
    state_path: str | None
    candidates: tuple[Candidate, ...]
    common_prefix: str
    shared_storages: tuple[tuple[str, ...], ...]
    extras: dict[str, Any]
    placeholders: tuple[str, ...]
    metadata: dict[str, str]
    files: tuple[str, ...]
    rows: tuple[TensorRow, ...] = ()
    modules: tuple[ModuleRow, ...] = ()
    nonfinite: int = 0
    filter: str | None = None
    depth: int | None = None
    notes: tuple[str, ...] = field(default=())
    # TorchScript tensor attributes that are not parameters or buffers (not in ``state_dict()``)
    attributes: tuple[TensorRow, ...] = ()
    # entries of the state dict that are not tensors (``_extra_state``), summarized
    objects: dict[str, Any] = field(default_factory=dict)
    # optimizer states beside the state dict (ckpt_tool.optim_state), header-only
    optimizers: tuple[OptimizerSummary, ...] = ()
    buffers: int = 0
    # how ``modules`` folds a long listing (see ``fold_over``); "" when ``rows`` lists every tensor
    folded: str = ""


@paused
def inspect_checkpoint(
    path: str,
    key: str | None = None,
    *,
    depth: int | None = None,
    filter: str | None = None,
    stats: bool = False,
    progress: Progress | None = None,
    fold_over: int | None = None,
) -> InspectReport:
    """Describe a checkpoint; with ``stats`` also stream its values (tensor by tensor).

    Args:
        path: the checkpoint (any supported format, or a sharded index/directory).
        key: nested state dict to describe (default: the obvious one).
        depth: roll keys up by module prefix of this many components.
        filter: keep only keys matching this regular expression.
        stats: read values and add min/max/mean/std and NaN/Inf counts.
        progress: called with ``(bytes read now, bytes to read)`` after each tensor (``stats`` only).
        fold_over: when more tensors than this are listed (without ``depth``), ``rows`` stays empty
            and ``modules`` holds them folded by :func:`fold`, which ``folded`` names (the table
            of ``ckpt inspect``: 100,000 rows are never built to be folded).

    Example:
        >>> report = inspect_checkpoint("fixtures/tiny_cnn.pth", depth=1)
        >>> [m.name for m in report.modules]
        ['features', 'classifier']
    """
    if depth is not None and depth < 1:
        raise UsageError("--depth must be 1 or more")
    pattern = _compile(filter)
    ckpt = open_checkpoint(path, key, optimizer=True)
    refs = [r for r in ckpt.tensors.values() if pattern is None or pattern.search(r.key)]
    shared = ckpt.shared_storages()
    stats_by_key: dict[str, TensorStats] = {}
    if stats:
        total = sum(r.nbytes for r in refs)
        with FileCache() as files:
            for ref in refs:
                if has_bytes(ref):
                    stats_by_key[ref.key] = tensor_stats(ref, files)
                if progress is not None:
                    progress(ref.nbytes, total)
    folded = ""
    modules: tuple[ModuleRow, ...] = ()
    if depth is not None:
        modules = rollup(refs, depth)
    elif fold_over is not None and len(refs) > fold_over:
        folded, modules = fold(refs, fold_over)
    rows: tuple[TensorRow, ...] = ()
    if depth is None and not folded:
        stats_of = stats_by_key.get
        rows = tuple(_row(r, shared, stats_of(r.key)) for r in refs)
    attributes = tuple(_row(r, {}, None) for r in ckpt.attributes.values())
    parameters, buffers, by_dtype = _counts(ckpt.tensors.values(), shared)
    notes = _notes(ckpt) + (STD_NOTE,) * bool(stats)
    optimizers: tuple[OptimizerSummary, ...] = ()
    if ckpt.root is not None and ckpt.extras:  # optimizer state lies beside the state dict, among its extras
        from .optim_state import summarize_optimizers  # (and imports the planner: not for a bare state dict)

        optimizers = summarize_optimizers(ckpt)
    kind = ckpt.format
    if is_trainer_dir(path):  # checkpoint-500/: optimizer.pt and the other training files beside the weights
        from .optim_state.trainer import describe_trainer

        kind, optimizers, trainer_files = describe_trainer(path, ckpt)
        notes += tuple(f"Trainer file {f}" for f in trainer_files)
    return InspectReport(
        path=ckpt.path,
        format=kind,
        file_size=ckpt.file_size,
        tensors=len(ckpt.tensors),
        parameters=parameters,
        buffers=buffers,
        tensor_bytes=sum(by_dtype.values()),
        bytes_by_dtype=by_dtype,
        state_path=ckpt.state_path,
        candidates=ckpt.candidates,
        common_prefix=common_prefix(list(ckpt.tensors)),
        shared_storages=tuple(tuple(keys) for keys in shared.values()),
        extras=ckpt.extras,
        placeholders=ckpt.placeholders,
        metadata=ckpt.metadata,
        files=ckpt.files,
        rows=rows,
        modules=modules,
        folded=folded,
        nonfinite=sum(s.nan + s.inf for s in stats_by_key.values()),
        filter=filter,
        depth=depth,
        notes=notes,
        attributes=attributes,
        objects={k: summarize(v) for k, v in ckpt.objects.items()},
        optimizers=optimizers,
    )


_BUFFER_ENDS = tuple(f".{name}" for name in BUFFER_NAMES)


def _counts(refs: Iterable[TensorRef], shared: dict[str, list[str]]) -> tuple[int, int, dict[str, int]]:
    """Values, the part of them in buffers (by name), and bytes per dtype: the views of a shared
    storage each counted once, each storage's bytes once."""
    by_dtype: dict[str, int] = {}
    parameters = buffers = 0
    views: set[tuple[str, int, tuple[int, ...], tuple[int, ...]]] = set()
    storages: set[str] = set()
    prod, sizes = math.prod, DTYPES
    for ref in refs:
        numel = prod(ref.shape)
        n = ref.nbytes if ref.kind in SPARSE_KINDS else numel * sizes[ref.dtype][0]
        if shared and ref.storage in shared and ref.kind == DENSE:
            view = (ref.storage, ref.storage_offset, ref.shape, ref.stride)
            if view in views:
                continue  # a tied alias: the same values under another name (model.parameters() counts it once)
            n = 0 if ref.storage in storages else ref.storage_nbytes
            views.add(view)
            storages.add(ref.storage)
        by_dtype[ref.dtype] = by_dtype.get(ref.dtype, 0) + n
        parameters += numel
        if ref.key.endswith(_BUFFER_ENDS) or ref.key in BUFFER_NAMES:
            buffers += numel
    return parameters, buffers, dict(sorted(by_dtype.items()))


def _compile(filter: str | None) -> re.Pattern[str] | None:
    if filter is None:
        return None
    try:
        return re.compile(filter)
    except re.error as exc:
        raise UsageError(f"--filter {filter!r} is not a regular expression ({exc})") from None


_strides = functools.lru_cache(maxsize=4096)(contiguous_strides)  # a checkpoint repeats a few shapes


_build_row = fast_constructor(TensorRow)


def _row(ref: TensorRef, shared: dict[str, list[str]], stats: TensorStats | None) -> TensorRow:
    key, shape, dtype, kind = ref.key, ref.shape, ref.dtype, ref.kind
    dense = kind == DENSE
    numel = math.prod(shape)
    at = ref.data_offset
    item = DTYPES[dtype][0] if dense or at is not None else 0
    storage = ref.storage
    return _build_row(
        # contiguous: the common layout, and the cheap one to recognise (strides are cached by shape)
        ref.stride == _strides(shape) or ref.is_contiguous,
        ("" if dense else composite_detail(ref)) or (chunk_summary(ref) if ref.attrs else ""),  # detail
        dtype,
        kind,
        key,
        numel * item if dense else ref.nbytes,  # nbytes
        ref.note,
        None if at is None else at + ref.storage_offset * item,  # offset (TensorRef.offset, inlined)
        numel,  # parameters
        shape,
        tuple(k for k in shared[storage] if k != key) if shared and storage in shared else (),  # shared_with
        stats,
        storage,
        ref.stride,
    )


def composite_detail(ref: TensorRef) -> str:
    """What a sparse or quantized tensor is made of, in a few words (``scale 0.1, zero point 3``)."""
    a, parts = ref.attr, ref.part
    if ref.kind in SPARSE_KINDS:
        values = parts.get("values")
        index = next((p for n, p in ref.parts if n != "values"), None)
        nnz = values.shape[0] if values is not None and values.shape else 0
        return f"{nnz} stored values, {index.dtype if index else '?'} indices"
    if ref.kind == QUANTIZED:
        if "scale" in a:
            return f"{a.get('qscheme')}, scale {a['scale']:.6g}, zero point {a.get('zero_point')}"
        scales = parts.get("scales")
        return f"{a.get('qscheme')} on axis {a.get('axis')}, {scales.numel if scales else '?'} scales"
    if ref.kind == DTENSOR_SHARD:
        return f"one shard of {list(a.get('dtensor_shape', ()))}"
    return ""


def module_of(key: str, depth: int) -> str:
    """The module prefix of ``key`` cut to ``depth`` components (``features.0.weight``, 1 -> ``features``)."""
    parts = key.split(".")
    module = parts[:-1] or parts
    return ".".join(module[:depth])


def rollup(refs: Sequence[TensorRef | TensorRow], depth: int) -> tuple[ModuleRow, ...]:
    """Tensors (refs or rows) grouped by module prefix of ``depth`` components, in first-seen order."""
    return _group(refs, lambda name: module_of(name, depth))


def _group(refs: Sequence[TensorRef | TensorRow], module: Callable[[str], str]) -> tuple[ModuleRow, ...]:
    return _group_named(refs, [module(name) for name in _names(refs)])


def _names(refs: Sequence[TensorRef | TensorRow]) -> list[str]:
    return [r.key if isinstance(r, TensorRef) else r.name for r in refs]


def _group_named(refs: Sequence[TensorRef | TensorRow], names: Sequence[Any]) -> tuple[ModuleRow, ...]:
    """``refs`` grouped by their module names ``names`` (one per ref), in first-seen order."""
    return _module_rows(_tally(refs, names))


def _tally(refs: Sequence[TensorRef | TensorRow], names: Sequence[Any]) -> dict[Any, list[Any]]:
    """Name -> [tensors, values, bytes, dtypes] of the refs under it, in first-seen order."""
    groups: dict[Any, list[Any]] = {}
    prod, sizes = math.prod, DTYPES
    for r, m in zip(refs, names):
        if isinstance(r, TensorRef):
            numel = prod(r.shape)
            nbytes = numel * sizes[r.dtype][0] if r.kind == DENSE else r.nbytes
        else:
            numel, nbytes = r.parameters, r.nbytes
        g = groups.get(m)
        if g is None:
            g = groups[m] = [0, 0, 0, set()]
        g[0] += 1
        g[1] += numel
        g[2] += nbytes
        g[3].add(r.dtype)
    return groups


def _merged(groups: dict[Any, list[Any]], names: Sequence[str]) -> dict[str, list[Any]]:
    """Tallies (in first-seen order) merged under their names ``names`` (one per tally), in first-seen order."""
    out: dict[str, list[Any]] = {}
    for (n, p, b, d), m in zip(groups.values(), names):
        g = out.get(m)
        if g is None:
            out[m] = [n, p, b, set(d)]
        else:
            g[0] += n
            g[1] += p
            g[2] += b
            g[3] |= d
    return out


def _module_rows(groups: dict[Any, list[Any]]) -> tuple[ModuleRow, ...]:
    return tuple(ModuleRow(name, n, p, b, tuple(sorted(d))) for name, (n, p, b, d) in groups.items())


FOLD_ROWS = 1000  # above this many rows the table shows modules (``--all`` shows every row)
_NUMBERED = re.compile(r"(?<=\.)\d+(?=\.|$)|^\d+(?=\.|$)")
_NUMBERED_LINES = re.compile(_NUMBERED.pattern, re.MULTILINE)  # the same, of each line of a text


def numbered_module(key: str) -> str:
    """A key's module with its numbered components as ``*``: ``model.layers.7.mlp.experts.12.up.weight``
    -> ``model.layers.*.mlp.experts.*.up``."""
    return _numbered(key.rpartition(".")[0] if "." in key else key)


@functools.lru_cache(maxsize=1 << 16)
def _numbered(module: str) -> str:
    # the tensors of a module share it: a 100,000-tensor table has about half as many modules
    return _NUMBERED.sub("*", module)


def _numbered_all(modules: list[str]) -> list[str]:
    """:func:`_numbered` of each module, in one substitution over them all (50,000 modules of a
    100,000-tensor table); one by one when a name holds a line break itself."""
    text = "\n".join(modules)
    if text.count("\n") != len(modules) - 1:
        return [_numbered(m) for m in modules]
    return _NUMBERED_LINES.sub("*", text).split("\n") if modules else []


def fold(rows: Sequence[TensorRef | TensorRow], limit: int = FOLD_ROWS) -> tuple[str, tuple[ModuleRow, ...]]:
    """A long table's tensors (refs or rows) grouped into at most ``limit`` modules: ``(how, groups)``.

    By module (the key less its last component) when that is few enough groups; else with the
    numbered components of a module as ``*`` (``model.layers.*.mlp``: every layer's ``mlp`` in one
    row); else by the deepest module prefix that gives few enough.

    Example:
        >>> rows = inspect_checkpoint("fixtures/tiny_cnn.pth").rows
        >>> how, modules = fold(rows, limit=4)
        >>> how, [m.name for m in modules]
        ('numbered components as *', ['features.*', 'classifier.fc1', 'classifier.fc2'])
    """
    keys = _names(rows)
    # each tensor tallied once under its module, the key less its last component (a key without a
    # dot: under itself, which is "" by module); the folds then merge the modules' tallies
    per_module = _tally(rows, [k.rpartition(".")[0] if "." in k else (k,) for k in keys])
    sources = list(per_module)
    by_module = [m if type(m) is str else "" for m in sources]
    if len(set(by_module)) <= limit:
        return "by module", _module_rows(_merged(per_module, by_module))
    numbered = _numbered_all([m if type(m) is str else m[0] for m in sources])
    if len(set(numbered)) <= limit:
        return "numbered components as *", _module_rows(_merged(per_module, numbered))
    best = rollup(rows, 1)
    for depth in range(2, max((k.count(".") for k in keys), default=0) + 1):
        modules = rollup(rows, depth)
        if len(modules) > limit:
            break
        best = modules
    return f"by prefixes of {max(m.name.count('.') for m in best) + 1} components", best


STD_NOTE = "std is torch's default, the unbiased (n - 1) standard deviation; a one-element tensor gives nan"


def _notes(ckpt: Checkpoint) -> tuple[str, ...]:
    notes = _object_notes(ckpt)
    dangerous = _dangerous(ckpt.placeholders)
    if dangerous:
        notes.append(
            f"the pickle names {', '.join(dangerous[:5])}{' ...' if len(dangerous) > 5 else ''}, which "
            "would run when loaded with torch.load(weights_only=False); ckpt ran nothing (see `ckpt scan`)"
        )
    if len(ckpt.candidates) > 1:
        others = [c.path or "<top level>" for c in ckpt.candidates if c.path != ckpt.state_path]
        notes.append(
            f"{len(ckpt.candidates)} state dicts found; showing {ckpt.state_path or '<top level>'!r}, "
            f"pick another with --key ({', '.join(others)})"
        )
    if not ckpt.tensors:
        notes.append("no state dict found in this file")
    if ckpt.format == "torchscript":
        notes.append(
            "TorchScript archive: parameters and buffers recovered from its module attributes"
            + (
                f"; {len(ckpt.attributes)} other tensor attributes listed apart (not in state_dict())"
                if ckpt.attributes
                else ""
            )
        )
    elif any(c.path == ckpt.state_path for c in ckpt.candidates) and _is_module_tree(ckpt):
        notes.append(
            "a whole pickled model (torch.save(model)): state dict recovered from its module tree; "
            "its classes were not imported"
        )
    return tuple(notes)


def _object_notes(ckpt: Checkpoint) -> list[str]:
    """What the state dict holds besides plain tensors, and how ckpt read it."""
    notes: list[str] = []
    refs = list(ckpt.tensors.values())
    notes.extend(grouped_notes((r.key, r.note) for r in refs if r.note and r.kind != DTENSOR_SHARD))
    for r in refs:
        if r.kind == DTENSOR_SHARD:
            notes.append(f"{r.key!r}: {r.note}; commands that write refuse it (save a full state dict instead)")
    kinds: dict[str, int] = {}
    for r in refs:
        if r.kind in SPARSE_KINDS or r.kind == QUANTIZED:
            kinds[r.kind] = kinds.get(r.kind, 0) + 1
    if kinds:
        notes.append(
            "composite tensors: "
            + ", ".join(f"{n} {k.replace('_', ' ')}" for k, n in kinds.items())
            + " (see kind and detail)"
        )
    packed = packed_params(ckpt)
    if packed:
        notes.append(
            f"{len(packed)} entries are packed weights of dynamically quantized layers (quantize_dynamic), "
            "opaque to ckpt and not counted as tensors: "
            + "; ".join(f"{k} ({what})" for k, what in list(packed.items())[:5])
            + (" ..." if len(packed) > 5 else "")
        )
    if any(p.endswith("PackedParams") for p in ckpt.placeholders):
        notes.append(
            "a pickled dynamically quantized model: its packed weights are torch.ScriptObjects that only "
            "torch can unpack, so they are not listed (torch.save(model.state_dict()) saves them as tensors)"
        )
    if ckpt.objects:
        notes.append(
            f"{len(ckpt.objects)} state-dict entries are not tensors: {', '.join(list(ckpt.objects)[:5])}"
            + (" ..." if len(ckpt.objects) > 5 else "")
        )
    if _optimizer_path(ckpt) is not None:
        notes.append(_optimizer_note(ckpt))
    return notes


def _optimizer_path(ckpt: Checkpoint) -> Any:
    from .reader import walk_key

    if not ckpt.state_path:
        return None
    obj = walk_key(ckpt.root, ckpt.state_path)[0]
    return obj if isinstance(obj, dict) and "state" in obj and "param_groups" in obj else None


def _optimizer_note(ckpt: Checkpoint) -> str:
    opt = _optimizer_path(ckpt)
    groups = opt.get("param_groups") if isinstance(opt.get("param_groups"), list) else []
    state = opt.get("state") if isinstance(opt.get("state"), dict) else {}
    hyper = sorted({k for g in groups if isinstance(g, dict) for k in g if k != "params"})
    return (
        f"optimizer state: {len(state)} parameters with state in {len(groups)} param groups "
        f"(hyperparameters: {', '.join(hyper[:8]) or 'none'}); keys are state.<parameter index>.<name>, "
        f"and --key {ckpt.state_path}/state/<index> shows one parameter"
    )


def _dangerous(names: tuple[str, ...]) -> list[str]:
    """The globals a loader would run that scan's deny list names (the scan tables load only when needed)."""
    if not names:
        return []
    from .scan import UNSAFE, Policy

    policy = Policy()
    return [name for name in names if policy.judge(name)[0] == UNSAFE]


def _is_module_tree(ckpt: Checkpoint) -> bool:
    from .formats.pickle_vm import Placeholder
    from .reader import walk_key

    obj = ckpt.root if not ckpt.state_path else walk_key(ckpt.root, ckpt.state_path)[0]
    return isinstance(obj, Placeholder)
