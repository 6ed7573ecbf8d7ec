"""torch.distributed.checkpoint (DCP) directories, read without torch.

torch's ``FileSystemWriter`` writes a directory holding ``.metadata`` and one ``__R_S.distcp`` file
per writer. ``.metadata`` is a pickle of a ``Metadata`` dataclass, which our interpreter reads as
inert placeholders: ``state_dict_metadata`` maps each key to a ``TensorStorageMetadata`` (dtype,
global size, chunks as offsets and sizes) or a ``BytesStorageMetadata``; ``storage_data`` maps each
``MetadataIndex(fqn, offset)`` to a ``_StorageInfo(relative_path, offset, length)``. Every stored
item is a whole ``torch.save`` archive at ``[offset, offset + length)`` of its file: one chunk of a
tensor (read back with ``torch.load(weights_only=True)``) or, for a bytes entry, the object itself
(read back with ``torch.load(weights_only=False)``, which ``scan`` therefore judges like any pickle).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass, replace
from typing import IO, Any

from ..checkpoint import DENSE, Candidate, Checkpoint, TensorRef, contiguous_strides, itemsize, numel, total_numel
from ..errors import FormatError, InputError
from .pickle_vm import GlobalRef, PickledTensor, PickleVM, Placeholder, StorageRef, TorchDType, TorchLayout, Trace
from .ziparchive import STORED, data_offset, list_stream

METADATA = ".metadata"
SHARD_SUFFIX = ".distcp"
FORMAT = "dcp"
# a tensor gathered from several chunks keeps them here (``TensorRef.attrs``): ((offsets, chunk ref), ...)
CHUNKS_ATTR = "dcp_chunks"
MAX_METADATA = 1 << 30
_MD = "torch.distributed.checkpoint.metadata."


@dataclass(frozen=True)
class StoredItem:
    """Where one stored item's ``torch.save`` archive lies: ``length`` bytes at ``offset`` of ``file``."""

    file: str
    offset: int
    length: int
    transforms: tuple[str, ...] = ()


@dataclass(frozen=True)
class DcpChunk:
    offsets: tuple[int, ...]
    sizes: tuple[int, ...]
    item: StoredItem


@dataclass(frozen=True)
class DcpTensor:
    key: str
    dtype: str
    shape: tuple[int, ...]
    chunks: tuple[DcpChunk, ...]
    requires_grad: bool = False


@dataclass(frozen=True)
class DcpMetadata:
    """What ``.metadata`` says: tensors and bytes entries in its order, and the files it names."""

    directory: str
    tensors: dict[str, DcpTensor]
    objects: dict[str, StoredItem]
    files: tuple[str, ...]
    version: str
    trace: Trace
    # each key's place in the nested state dict that was saved (planner_data): "model.0.weight" ->
    # ("model", "0", "weight")
    paths: dict[str, tuple[str, ...]]

    def items(self) -> Iterator[tuple[str, StoredItem]]:
        """Every stored item, described (``chunk [0, 0] of 'w'``, ``bytes entry 'step'``)."""
        for key, t in self.tensors.items():
            for c in t.chunks:
                yield f"chunk {list(c.offsets)} of tensor {key!r}", c.item
        for key, item in self.objects.items():
            yield f"bytes entry {key!r}", item


def is_dcp_dir(path: str) -> bool:
    return os.path.isdir(path) and os.path.isfile(os.path.join(path, METADATA))


def shard_error(path: str) -> InputError:
    """The one-line refusal of a lone ``.distcp`` file: it is one shard of a directory."""
    directory = os.path.dirname(os.path.abspath(path))
    if is_dcp_dir(directory):
        return InputError(
            f"{path}: is one shard of the torch.distributed.checkpoint directory {directory}; "
            "open the directory instead"
        )
    return InputError(
        f"{path}: is one shard of a torch.distributed.checkpoint directory, but {directory} holds "
        f"no {METADATA}; open the directory that holds it with its {METADATA}"
    )


def read_metadata(directory: str) -> DcpMetadata:
    """Decode ``DIR/.metadata`` into inert data, checking every field the chunks are found by."""
    path = os.path.join(directory, METADATA)
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            trace = Trace()
            root = PickleVM(None, trace).load(f, min(size, MAX_METADATA))
    except OSError as exc:
        raise InputError(f"{path}: cannot be read ({exc.strerror or exc})") from None
    except FormatError as exc:
        raise FormatError(f"{path}: not a readable DCP metadata pickle ({exc}; truncated?)") from None
    state = _state(root, "Metadata", path)
    entries = state.get("state_dict_metadata")
    storage = state.get("storage_data")
    if not isinstance(entries, dict) or not isinstance(storage, dict):
        raise FormatError(f"{path}: DCP metadata without state_dict_metadata or storage_data")
    items: dict[tuple[str, tuple[int, ...] | None], StoredItem] = {}
    for index, info in storage.items():
        idx = _state(index, "MetadataIndex", path)
        fqn, offset = idx.get("fqn"), idx.get("offset")
        items[(str(fqn), _ints(offset, path) if offset is not None else None)] = _item(info, directory, path)
    tensors: dict[str, DcpTensor] = {}
    objects: dict[str, StoredItem] = {}
    for key, entry in entries.items():
        key = str(key)
        name = entry.name if isinstance(entry, Placeholder) else ""
        if name == _MD + "BytesStorageMetadata":
            item = items.get((key, None))
            if item is None:
                raise FormatError(f"{path}: bytes entry {key!r} has no storage record")
            objects[key] = item
        elif name == _MD + "TensorStorageMetadata":
            tensors[key] = _tensor(key, _state(entry, "TensorStorageMetadata", path), items, path)
        else:
            raise FormatError(f"{path}: entry {key!r} is a {name or type(entry).__name__}, not a DCP storage record")
    files = tuple(dict.fromkeys(i.file for i in [*items.values()]))
    version = state.get("version")
    planned = state.get("planner_data")
    planned = planned if isinstance(planned, dict) else {}
    paths: dict[str, tuple[str, ...]] = {}
    for key in [*tensors, *objects]:
        saved = planned.get(key)
        # without planner data (another planner wrote it), DCP's own flattening joined the path with dots
        paths[key] = (
            tuple(str(p) for p in saved) if isinstance(saved, (tuple, list)) and saved else tuple(key.split("."))
        )
    return DcpMetadata(directory, tensors, objects, files, str(version) if version else "", trace, paths)


def _state(obj: Any, cls: str, path: str) -> dict[Any, Any]:
    if not (isinstance(obj, Placeholder) and obj.name.rpartition(".")[2] == cls and isinstance(obj.state, dict)):
        raise FormatError(f"{path}: expected a {cls} record, found {obj!r}")
    return obj.state


def _ints(value: Any, path: str) -> tuple[int, ...]:
    if isinstance(value, (tuple, list)) and all(
        isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in value
    ):
        return tuple(value)
    raise FormatError(f"{path}: expected a size or offsets, found {value!r}")


def _item(info: Any, directory: str, path: str) -> StoredItem:
    from ..reader import shard_location

    s = _state(info, "_StorageInfo", path)
    rel, offset, length = s.get("relative_path"), s.get("offset"), s.get("length")
    if (
        not isinstance(rel, str)
        or not isinstance(offset, int)
        or not isinstance(length, int)
        or offset < 0
        or length < 0
    ):
        raise FormatError(f"{path}: a storage record without a file, offset and length")
    transforms = s.get("transform_descriptors") or ()
    return StoredItem(shard_location(directory, rel, path), offset, length, tuple(str(t) for t in transforms))


def _dtype(props: Any, key: str, path: str) -> tuple[str, bool]:
    state = props.state if isinstance(props, Placeholder) else None
    if isinstance(state, dict):  # older torch pickled TensorProperties' __dict__
        state = (state.get("dtype"), state.get("layout"), state.get("requires_grad", False))
    if not isinstance(state, tuple) or len(state) < 3:
        raise FormatError(f"{path}: tensor {key!r} has no TensorProperties")
    dtype, layout, requires_grad = state[0], state[1], state[2]
    name = dtype.name if isinstance(dtype, TorchDType) else dtype.name if isinstance(dtype, GlobalRef) else None
    if name is None or name not in _dtypes():
        raise FormatError(f"{path}: tensor {key!r} has an unknown dtype {dtype!r}")
    if isinstance(layout, TorchLayout) and layout.name != "torch.strided":
        raise FormatError(f"{path}: tensor {key!r} has layout {layout.name}; ckpt reads strided DCP tensors only")
    return name, bool(requires_grad)


def _dtypes() -> dict[str, Any]:
    from ..checkpoint import DTYPES

    return DTYPES


def _tensor(
    key: str, s: dict[Any, Any], items: dict[tuple[str, tuple[int, ...] | None], StoredItem], path: str
) -> DcpTensor:
    dtype, requires_grad = _dtype(s.get("properties"), key, path)
    shape = _ints(s.get("size"), path)
    raw = s.get("chunks")
    if not isinstance(raw, list):
        raise FormatError(f"{path}: tensor {key!r} has no chunk list")
    chunks = []
    for c in raw:
        cs = _state(c, "ChunkStorageMetadata", path)
        offsets, sizes = _ints(cs.get("offsets"), path), _ints(cs.get("sizes"), path)
        if (
            len(offsets) != len(shape)
            or len(sizes) != len(shape)
            or any(o + n > d for o, n, d in zip(offsets, sizes, shape))
        ):
            raise FormatError(
                f"{path}: tensor {key!r}: chunk at {list(offsets)} of size {list(sizes)} lies outside "
                f"its shape {list(shape)}"
            )
        item = items.get((key, offsets))
        if item is None:
            raise FormatError(f"{path}: tensor {key!r}: chunk at {list(offsets)} has no storage record")
        chunks.append(DcpChunk(offsets, sizes, item))
    if sum(numel(c.sizes) for c in chunks) != numel(shape) or _overlap(chunks):
        raise FormatError(f"{path}: tensor {key!r}: its chunks do not cover its shape {list(shape)} exactly once")
    return DcpTensor(key, dtype, shape, tuple(chunks), requires_grad)


def _overlap(chunks: list[DcpChunk]) -> bool:
    boxes = [c for c in chunks if numel(c.sizes)]
    for i, a in enumerate(boxes):
        for b in boxes[i + 1 :]:
            if all(ao < bo + bn and bo < ao + an for ao, an, bo, bn in zip(a.offsets, a.sizes, b.offsets, b.sizes)):
                return True
    return False


# --- the items: torch.save archives inside the .distcp files -----------------------------------------


class Window:
    """A byte range of an open file seen as a file of its own (an archive embedded in a .distcp)."""

    def __init__(self, f: IO[bytes], start: int, length: int) -> None:
        self.f, self.start, self.length, self.pos = f, start, length, 0

    def seek(self, pos: int, whence: int = 0) -> int:
        self.pos = pos if whence == 0 else self.pos + pos if whence == 1 else self.length + pos
        return self.pos

    def tell(self) -> int:
        return self.pos

    def fileno(self) -> int:
        # size checks against the whole file are looser than the window; reads never leave it
        return self.f.fileno()

    def read(self, n: int = -1) -> bytes:
        n = self.length - self.pos if n < 0 else min(n, self.length - self.pos)
        self.f.seek(self.start + self.pos)
        data = self.f.read(max(n, 0))
        self.pos += len(data)
        return data


def _check_item(item: StoredItem, size: int, what: str) -> None:
    if item.offset + item.length > size:
        raise FormatError(
            f"{item.file}: {what} is recorded at bytes {item.offset}-{item.offset + item.length}, "
            f"past the end of the file ({size} bytes; truncated?)"
        )
    if item.transforms:
        raise FormatError(
            f"{item.file}: {what} is stored through {', '.join(item.transforms)}, which ckpt does not read"
        )


def read_item(f: IO[bytes], item: StoredItem, what: str, trace: Trace | None = None) -> Any:
    """Decode one item's archive (its data.pkl) from ``f`` into inert data; storages at absolute offsets."""
    from .torchfile import read_pickle_entry, storage_loader

    label = f"{item.file}@{item.offset}"
    window = Window(f, item.offset, item.length)
    try:
        listing = list_stream(window, label, item.length)  # type: ignore[arg-type]
    except FormatError:
        raise FormatError(f"{item.file}: {what} at byte {item.offset} is not a torch.save archive") from None
    prefix = listing.prefix
    pkl = listing.find(prefix + "data.pkl")
    if pkl is None:
        raise FormatError(f"{item.file}: {what} at byte {item.offset} holds no data.pkl")

    def resolve(key: str, dtype: str, location: str, count: int) -> StorageRef:
        entry = listing.find(f"{prefix}data/{key}")
        nbytes = count * itemsize(dtype)
        if entry is None or entry.method != STORED or entry.size < nbytes:
            raise FormatError(f"{item.file}: {what}: storage {key} is missing, compressed or short")
        start = data_offset(window, entry, label)  # type: ignore[arg-type]
        if start + nbytes > item.length:
            raise FormatError(f"{item.file}: {what}: storage {key} runs past the end of its item (truncated)")
        return StorageRef(f"{item.offset}/{key}", dtype, location, count, item.offset + start, nbytes, item.file)

    vm = PickleVM(storage_loader({}, resolve), trace if trace is not None else Trace())
    try:
        return read_pickle_entry(window, pkl, vm, label)  # type: ignore[arg-type]
    except FormatError as exc:
        raise FormatError(f"{item.file}: {what}: {str(exc).removeprefix(label + ': ')}") from None


def open_dcp(directory: str, key: str | None = None) -> Checkpoint:
    """Describe a DCP directory from its ``.metadata``: each tensor at its global shape, with its chunks.

    Only ``.metadata`` is decoded (and each bytes entry's small pickle); a chunk's archive is read
    when its bytes are (:func:`iter_gathered`), so describing costs no read per tensor. Every
    chunk is checked to lie inside an existing file.

    DCP flattens the nested state dict it saves (``{"model": ..., "optim": ...}``); ``key``
    (``model``, ``app/model``) picks the part under that path, named from there on, as ``--key``
    does for a torch file. By default the whole dict, unless every tensor lies under a top-level
    entry: then the one that looks like the model's (``model``, ``state_dict``...).
    """
    from ..reader import _known_global, summarize_extras
    from ..values import FileCache

    meta = read_metadata(directory)
    sizes: dict[str, int] = {}
    for name in meta.files:
        try:
            sizes[name] = os.path.getsize(name)
        except FileNotFoundError:
            raise InputError(f"{name}: shard file named in {METADATA} does not exist") from None
        except OSError as exc:
            raise InputError(f"{name}: cannot be read ({exc.strerror or exc})") from None
    for what, item in meta.items():
        _check_item(item, sizes[item.file], what)
    tensors = {fqn: _described(t, directory) for fqn, t in meta.tensors.items()}
    objects: dict[str, Any] = {}
    trace = Trace()
    with FileCache() as files:
        for fqn, item in meta.objects.items():
            objects[fqn] = read_item(files.get(item.file), item, f"bytes entry {fqn!r}", trace)
    size = sum(sizes.values()) + os.path.getsize(os.path.join(directory, METADATA))
    candidates = _candidates(meta.paths, tensors)
    chosen = _choose(directory, key, candidates, meta.paths, tensors)
    depth = len(chosen.path.split("/")) if chosen.path else 0
    prefix = tuple(chosen.path.split("/")) if chosen.path else ()
    inside = [k for k, p in meta.paths.items() if p[:depth] == prefix and len(p) > depth]
    root: dict[str, Any] = {}
    for k, p in meta.paths.items():
        # the nested dict that was saved, tensors as inert descriptions: what the entries beside the
        # chosen one are (an optimizer's state, an epoch), as for a torch file
        node = root
        for part in p[:-1]:
            node = node.setdefault(part, {}) if isinstance(node.get(part, {}), dict) else {}
        dt = meta.tensors.get(k)
        node[p[-1]] = PickledTensor(None, 0, dt.shape, contiguous_strides(dt.shape), dt.dtype) if dt else objects[k]

    def renamed(k: str) -> str:
        return ".".join(meta.paths[k][depth:])

    chosen_tensors = {renamed(k): replace(tensors[k], key=renamed(k)) for k in inside if k in tensors}
    extras = summarize_extras(root, chosen.path) if chosen.path else {}
    return Checkpoint(
        path=directory,
        format=FORMAT,
        file_size=size,
        tensors=chosen_tensors,
        state_path=chosen.path,
        candidates=candidates,
        extras=extras,
        metadata={"dcp.version": meta.version} if meta.version else {},
        files=meta.files,
        root=root,
        objects={renamed(k): objects[k] for k in inside if k in objects},
        placeholders=tuple(sorted({e.name for e in trace.globals if not _known_global(e.name)})),
    )


def _candidates(paths: dict[str, tuple[str, ...]], tensors: dict[str, TensorRef]) -> tuple[Candidate, ...]:
    """The whole dict when a tensor lies at its top level, and each top-level entry holding tensors."""
    groups: dict[str, list[TensorRef]] = {}
    for k, ref in tensors.items():
        p = paths[k]
        groups.setdefault(p[0] if len(p) > 1 else "", []).append(ref)
    out = [Candidate(name, len(refs), total_numel(refs)) for name, refs in groups.items() if name]
    if "" in groups or not out:
        out.insert(0, Candidate("", len(tensors), total_numel(tensors.values())))
    return tuple(out)


def _choose(
    directory: str,
    key: str | None,
    candidates: tuple[Candidate, ...],
    paths: dict[str, tuple[str, ...]],
    tensors: dict[str, TensorRef],
) -> Candidate:
    from ..errors import KeyPathError
    from ..reader import PREFERRED_KEYS

    if key:
        parts = tuple(key.split("/" if "/" in key else "."))
        under = [
            tensors[k] for k, p in paths.items() if k in tensors and p[: len(parts)] == parts and len(p) > len(parts)
        ]
        found = Candidate("/".join(parts), len(under), total_numel(under)) if under else None
        if found is None:
            choices = ", ".join(repr(c.path or "<top level>") for c in candidates)
            raise KeyPathError(f"{directory}: no state dict at --key {key!r} (candidates: {choices})")
        return found
    if candidates[0].path == "" or len(candidates) == 1:
        return candidates[0]
    by_path = {c.path: c for c in candidates}
    for name in PREFERRED_KEYS:
        if name in by_path:
            return by_path[name]
    return max(candidates, key=lambda c: c.tensors)


def _described(t: DcpTensor, directory: str) -> TensorRef:
    where = sorted({os.path.basename(c.item.file) for c in t.chunks})
    return TensorRef(
        key=t.key,
        dtype=t.dtype,
        shape=t.shape,
        stride=contiguous_strides(t.shape),
        storage=f"{directory}#dcp:{t.key}",
        storage_offset=0,
        storage_nbytes=numel(t.shape) * itemsize(t.dtype),
        data_offset=None,
        file=t.chunks[0].item.file if t.chunks else directory,
        requires_grad=t.requires_grad,
        kind=DENSE,
        attrs=((CHUNKS_ATTR, t.chunks),),
        note=f"gathered from {len(t.chunks)} DCP chunks ({', '.join(where)})" if len(t.chunks) > 1 else "",
    )


def chunks_of(ref: TensorRef) -> tuple[DcpChunk, ...] | None:
    """The chunks of a DCP tensor, or None for any other tensor."""
    if ref.data_offset is not None or not ref.attrs or ref.attrs[0][0] != CHUNKS_ATTR:
        return None
    chunks: tuple[DcpChunk, ...] = ref.attrs[0][1]
    return chunks


def chunk_summary(ref: TensorRef) -> str:
    """``[0, 0]+[4, 3] in __0_0.distcp; ...``: where a DCP tensor's chunks are (inspect's detail)."""
    chunks = chunks_of(ref)
    if chunks is None:
        return ""
    return "; ".join(f"{list(c.offsets)}+{list(c.sizes)} in {os.path.basename(c.item.file)}" for c in chunks)


def chunk_ref(ref: TensorRef, chunk: DcpChunk, f: IO[bytes]) -> TensorRef:
    """A chunk as a plain tensor reference into its file, read from its archive and checked against ``.metadata``."""
    from ..reader import tensor_ref

    what = f"chunk {list(chunk.offsets)} of tensor {ref.key!r}"
    _check_item(chunk.item, os.fstat(f.fileno()).st_size, what)
    value = read_item(f, chunk.item, what)
    if not isinstance(value, PickledTensor) or value.storage is None:
        raise FormatError(f"{chunk.item.file}: {what} is not a tensor")
    if value.dtype != ref.dtype or value.shape != chunk.sizes:
        raise FormatError(
            f"{chunk.item.file}: {what} holds a {value.dtype}{list(value.shape)} tensor, "
            f"{METADATA} says {ref.dtype}{list(chunk.sizes)}"
        )
    return tensor_ref(ref.key, value, chunk.item.file)


def iter_gathered(ref: TensorRef, files: Any, chunk_bytes: int) -> Iterator[bytes]:
    """A DCP tensor's bytes in C order, one tensor in memory at most.

    A whole chunk, or chunks that split only the first dimension, are streamed in order, chunk by
    chunk; any other split is assembled into one buffer of the tensor's size.
    """
    from ..values import iter_raw_chunks

    chunks = chunks_of(ref)
    assert chunks is not None
    # pieces of exactly ``step`` bytes, as iter_raw_chunks gives any contiguous tensor: readers zip
    # two tensors' pieces together
    step = max(itemsize(ref.dtype), chunk_bytes - chunk_bytes % itemsize(ref.dtype))
    ordered = sorted(chunks, key=lambda c: c.offsets)
    if len(ordered) == 1:
        yield from iter_raw_chunks(chunk_ref(ref, ordered[0], files.get(ordered[0].item.file)), files, step)
        return
    if all(c.offsets[1:] == (0,) * (len(c.offsets) - 1) and c.sizes[1:] == ref.shape[1:] for c in ordered):
        pending = b""
        for c in ordered:
            for data in iter_raw_chunks(chunk_ref(ref, c, files.get(c.item.file)), files, step):
                pending = pending + data if pending else data
                while len(pending) >= step:
                    yield pending[:step]
                    pending = pending[step:]
        if pending:
            yield pending
        return
    import numpy as np

    out = np.zeros(ref.shape, dtype=np.dtype(f"V{itemsize(ref.dtype)}") if ref.numel else "u1")
    for c in ordered:
        if not numel(c.sizes):
            continue
        r = chunk_ref(ref, c, files.get(c.item.file))
        data = b"".join(iter_raw_chunks(r, files, chunk_bytes))
        part = np.frombuffer(data, dtype=out.dtype).reshape(r.shape)
        out[tuple(slice(a, a + n) for a, n in zip(c.offsets, r.shape))] = part
    flat = out.reshape(-1).view("u1")
    for start in range(0, len(flat), step):
        yield flat[start : start + step].tobytes()
