"""Every input object accounted for before a byte is written.

Each object of the chosen state dict is carried bit-identical (dense tensors; in a ``.pth`` also
sparse and quantized tensors, ``_extra_state`` entries and ``_metadata``), converted with a note
(a DTensor that holds its whole value; ``--dequantize``/``--densify``), or refused with one line
that names the key and the option that would convert it. Nothing is dropped silently.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
import weakref
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from .checkpoint import (
    DENSE,
    DTENSOR_SHARD,
    QUANTIZED,
    SPARSE_KINDS,
    Checkpoint,
    TensorRef,
    contiguous_strides,
    in_module,
)
from .errors import UsageError
from .formats.dcp import FORMAT as DCP
from .plan import CHECKPOINT, Entry, Operation, State
from .reader import packed_params
from .text import grouped_notes, some
from .writer import PTH, SAFETENSORS, View, refuse_for_safetensors


@dataclass
class ObjectPlan:
    """The state to write after conversions, the non-tensor entries and ``_metadata`` to carry, and notes."""

    state: State
    objects: tuple[tuple[str, Any], ...] = ()
    module_metadata: dict[str, Any] | None = None
    notes: list[str] = field(default_factory=list)
    _scratch: str | None = None

    def close(self) -> None:
        """Remove the scratch file that holds converted values (after they are written)."""
        if self._scratch is not None:
            _unlink(self._scratch)
            self._scratch = None


def _unlink(path: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)


def account(
    ckpt: Checkpoint,
    operations: Sequence[Operation],
    state: State,
    fmt: str,
    *,
    dequantize: bool = False,
    densify: bool = False,
    sharded: bool = False,
) -> ObjectPlan:
    """Decide for every input object how the output keeps it; raise :class:`UsageError` for what it cannot.

    Args:
        ckpt: the source, as read.
        operations: the plan's operations (key operations rename and drop ``_extra_state`` entries too).
        state: the planned tensors after the operations.
        fmt: ``"pth"`` or ``"safetensors"``.
        dequantize: write quantized tensors as float32 (``(q - zero_point) * scale``, by torch).
        densify: write sparse tensors dense (``to_dense()``, by torch).
        sharded: the output is split into shards (plain tensors only).
    """
    out = ObjectPlan(dict(state))
    converted: dict[str, Any] = {}
    read_as: list[tuple[str, str]] = []  # (key, the reader's note: a DTensor read whole)
    for key, e in state.items():
        ref = e.ref
        if ref is None:
            continue
        if ref.kind == DTENSOR_SHARD:
            raise UsageError(
                f"tensor {e.origin!r}: {ref.note}; ckpt cannot gather the other ranks' shards: save a "
                "full state dict (get_model_state_dict with StateDictOptions(full_state_dict=True))"
            )
        if ref.kind == QUANTIZED and dequantize:
            converted[key] = _dequantized(ref)
        elif ref.kind in SPARSE_KINDS and densify:
            converted[key] = _densified(ref)
        elif ref.kind != DENSE:
            if fmt == SAFETENSORS:
                refuse_for_safetensors(e.origin, ref.dtype, ref.kind)
            if sharded:
                raise UsageError(
                    f"tensor {e.origin!r} is {ref.kind.replace('_', ' ')}; sharded outputs hold plain "
                    f"tensors only: pass --{'dequantize' if ref.kind == QUANTIZED else 'densify'} "
                    "or write one file"
                )
            if e.dtype != e.source_dtype:
                raise UsageError(
                    f"tensor {e.origin!r} is {ref.kind.replace('_', ' ')} and cannot be cast in place; "
                    f"pass --{'dequantize' if ref.kind == QUANTIZED else 'densify'} to cast its values"
                )
        elif fmt == SAFETENSORS:
            refuse_for_safetensors(e.origin, e.dtype)
        if ref.note and ref.kind == DENSE:
            read_as.append((e.origin, ref.note))
    out.notes.extend(grouped_notes(read_as))
    if converted:
        _store(out, converted)
    _carry_entries(ckpt, operations, out, fmt, sharded)
    if ckpt.attributes:
        out.notes.append(
            f"{len(ckpt.attributes)} TorchScript tensor attributes are not part of state_dict() and are "
            f"not written: {', '.join(list(ckpt.attributes)[:5])}"
        )
    return out


# --- conversions (torch does the arithmetic) ------------------------------------------------------


def _dequantized(ref: TensorRef) -> Any:
    from .values import FileCache, composite_to_torch

    with FileCache() as files:
        return composite_to_torch(ref, files).dequantize()


def _densified(ref: TensorRef) -> Any:
    from .values import FileCache, composite_to_torch

    with FileCache() as files:
        return composite_to_torch(ref, files).to_dense().contiguous()


def _store(out: ObjectPlan, tensors: dict[str, Any]) -> None:
    """Write converted values to a scratch file and point their entries at it (the writer streams from there)."""
    import torch

    fd, path = tempfile.mkstemp(prefix="ckpt-converted-", suffix=".bin")
    out._scratch = path
    # removed by close() after writing, or when the plan is dropped (a refusal between planning and writing)
    weakref.finalize(out, _unlink, path)
    offset = 0
    with os.fdopen(fd, "wb") as f:
        for key, t in tensors.items():
            e = out.state[key]
            data = t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b""
            f.write(data)
            dtype = str(t.dtype).removeprefix("torch.")
            shape = tuple(t.shape)
            ref = TensorRef(key, dtype, shape, contiguous_strides(shape), f"{path}#{key}", 0, len(data), offset, path)
            kind = "dequantized" if e.ref is not None and e.ref.kind == QUANTIZED else "densified"
            cast = e.dtype if e.ref is not None and e.ref.kind in SPARSE_KINDS and e.dtype != e.source_dtype else dtype
            out.state[key] = replace(e, dtype=cast, source_dtype=dtype, shape=shape, ref=ref)
            out.notes.append(f"{e.origin}: {kind} to a dense {dtype} tensor")
            offset += len(data)


# --- entries that are not tensors, and _metadata -------------------------------------------------


def _refuse_packed_params(ckpt: Checkpoint, keys: dict[str, str]) -> None:
    packed = [k for k in packed_params(ckpt) if k in keys]
    if packed:
        raise UsageError(
            f"{ckpt.path}: {some(packed)}: packed weights of dynamically quantized layers (quantize_dynamic), "
            "which ckpt neither unpacks nor writes back (--dequantize converts tensors only): migrate the "
            "float model's checkpoint, or leave them out with --exclude '_packed_params'"
        )


def _carry_entries(ckpt: Checkpoint, operations: Sequence[Operation], out: ObjectPlan, fmt: str, sharded: bool) -> None:
    from .migrate import _NotPlain, _plain, _why_not_plain

    keys, metadata = carried_entries(ckpt, operations, out.state)
    _refuse_packed_params(ckpt, keys)
    objects: list[tuple[str, Any]] = []
    for key, value in ckpt.objects.items():
        new = keys.get(key)
        if new is None:
            continue  # dropped by the operations, as a tensor of that name would be
        try:
            plain = _plain(value)
        except _NotPlain:
            raise UsageError(
                f"state-dict entry {key!r} ({_why_not_plain(value)}) is neither a tensor nor plain data, "
                f"which ckpt cannot write back; leave it out with --exclude '^{key}$'"
            ) from None
        if fmt == SAFETENSORS or sharded:
            raise UsageError(
                f"state-dict entry {key!r} is not a tensor; {'safetensors' if fmt == SAFETENSORS else 'shards'}"
                f" hold tensors only: write one .pth, or leave it out with --exclude '^{key}$'"
            )
        objects.append((new, plain))
    out.objects = tuple(objects)
    if metadata is not None:
        if fmt == PTH and not sharded:
            out.module_metadata = metadata
        else:
            modules = f"_metadata (module versions of {len(ckpt.module_metadata or {})} modules) is not kept: "
            if fmt == DCP:
                out.notes.append(
                    modules + "a DCP directory has no place for it (dcp.load fills a state dict the model "
                    "made, with the model's own module versions)"
                )
            else:
                out.notes.append(
                    modules + f"{'safetensors' if fmt == SAFETENSORS else 'shards'} have no place for it "
                    "(load_state_dict then sees no module versions, as for any safetensors file)"
                )


def carried_entries(
    ckpt: Checkpoint, operations: Sequence[Operation], state: State
) -> tuple[dict[str, str], dict[str, Any] | None]:
    """Where the operations put the state dict's non-tensor entries and its ``_metadata``.

    Returns source key -> new key for each entry they keep (an entry follows its module's
    tensors), and ``_metadata`` renamed along (``None`` when the state dict has none). migrate
    writes them; finetune-check loads them, as ``load_state_dict`` of the written file would.
    """
    moved = _moves(state)
    keys = {key: new for key in ckpt.objects if (new := _rename_key(operations, key, moved)) is not None}
    metadata = rename_metadata(ckpt.module_metadata, operations, moved) if ckpt.module_metadata is not None else None
    return keys, metadata


def _moves(state: State) -> dict[str, str]:
    """Source key -> output key for every tensor the checkpoint supplied."""
    return {e.origin: k for k, e in state.items() if e.source == CHECKPOINT and e.transform != ("copy",)}


def _rename_key(operations: Sequence[Operation], key: str, moved: dict[str, str]) -> str | None:
    """Apply the key operations to one key as if it were a tensor's; ``None`` when they drop it."""
    probe: State = {key: Entry(key, "uint8", (0,), CHECKPOINT, key, "uint8")}
    try:
        for op in operations:
            if not op.needs_target and op.op != "cast":
                probe = op.apply(probe, None)
    except UsageError:
        # the operations refuse a lone key (it matches none of them): follow its module instead
        module = key.rpartition(".")[0]
        new = _rename_module(module, moved)
        return None if new is None else (f"{new}.{key.rpartition('.')[2]}" if new else key.rpartition(".")[2])
    return next(iter(probe), None)


def _rename_module(module: str, moved: dict[str, str]) -> str | None:
    """Where a module's tensors went: ``module`` -> ``backbone.module``; ``None`` when all of them were dropped."""
    had = False
    for origin, new in moved.items():
        if not in_module(origin, module) or origin == module:
            continue
        had = True
        suffix = origin[len(module) + 1 :] if module else origin
        if new == suffix:
            return ""
        if new.endswith("." + suffix):
            return new[: -len(suffix) - 1]
    return None if had else module


def rename_metadata(meta: dict[str, Any], operations: Sequence[Operation], moved: dict[str, str]) -> dict[str, Any]:
    """``_metadata`` renamed along with the keys, as ``consume_prefix_in_state_dict_if_present`` does.

    A module's entry follows its tensors (``module.fc`` -> ``fc``; ``module`` -> the root, replacing
    the root's entry); a module whose tensors were all dropped loses its entry; modules without
    tensors (a ReLU) follow the key operations.
    """
    out: dict[str, Any] = {"": meta[""]} if "" in meta else {}
    for module, value in meta.items():
        if module == "":
            continue
        new = _rename_module(module, moved)
        if new == module and not any(in_module(o, module) for o in moved):
            probe = _rename_key(operations, module + "._", moved)
            new = None if probe is None else probe[:-2]
        if new is not None:
            out[new] = value
    return out


# --- views of composites in the written layout ---------------------------------------------------


def composite_views(entries: Iterable[Entry], blob_of: Callable[[TensorRef], int]) -> Iterator[View]:
    """The views of sparse and quantized entries (``.pth``): one blob per part, their bytes carried as they are."""
    for e in entries:
        ref = e.ref
        assert ref is not None
        parts = tuple((name, _part_view(f"{e.key}#{name}", p, blob_of)) for name, p in ref.parts)
        if ref.kind in SPARSE_KINDS:
            values = dict(parts)["values"]
            yield View(e.key, values.blob, e.dtype, e.shape, (), 0, ref.kind, parts, ref.attrs)
        else:
            yield View(
                e.key, blob_of(ref), e.dtype, e.shape, contiguous_strides(e.shape), 0, ref.kind, parts, ref.attrs
            )


def _part_view(key: str, ref: TensorRef, blob_of: Callable[[TensorRef], int]) -> View:
    return View(key, blob_of(ref), ref.dtype, ref.shape, contiguous_strides(ref.shape))


def is_composite(e: Entry) -> bool:
    return e.ref is not None and e.ref.kind != DENSE
