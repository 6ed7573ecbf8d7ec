"""Readers for torch's own files: the zip archive (and TorchScript), the legacy format, plain pickles.

Each returns a :class:`RawFile`: the decoded object tree (with :class:`PickledTensor` leaves), the
storages with their byte positions, and the trace of what the pickles asked for.
"""

from __future__ import annotations

import contextlib
import io
import mmap
import os
import re
import struct
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import IO, Any

from ..checkpoint import itemsize
from ..errors import FormatError
from . import sniff as fmt
from .pickle_stream import opcode_budget
from .pickle_vm import (
    PickleVM,
    Placeholder,
    StorageRef,
    Trace,
    build_storage_ref,
    storage_dtype,
    storage_dtypes,
    walk_tensors,
)
from .ziparchive import STORED, ZipEntry, ZipListing, crc_ok, list_archive, read_entry, undecodable

MAX_DATA_PKL = 256 << 20  # far above any real data.pkl; refuses zip bombs


@dataclass
class RawFile:
    path: str
    format: str
    file_size: int
    root: Any
    storages: dict[str, StorageRef] = field(default_factory=dict)
    trace: Trace = field(default_factory=Trace)
    pickles: list[str] = field(default_factory=list)  # names of the pickle streams read
    extra_pickles: dict[str, Any] = field(default_factory=dict)
    # TorchScript: class qualname -> (declared parameters, declared buffers), read from code/
    script_classes: dict[str, tuple[set[str], set[str]]] = field(default_factory=dict)


def read_zip(path: str, file_size: int, trace: Trace | None = None, fmt_name: str = fmt.ZIP) -> RawFile:
    """Read a torch zip archive (``torch.save`` since 1.6, TorchScript) without its tensor bytes.

    Entries are found as torch's own reader finds them (see :mod:`.ziparchive`): in the folder of
    the archive's first entry, by case-insensitive name, the first of two equal names.
    """
    trace = trace if trace is not None else Trace()
    listing = list_archive(path)
    bad = [e.name for e in listing.entries if not e.name.isascii() and undecodable(e.name)]
    if bad:
        raise FormatError(f"{path}: corrupt zip archive (entry name {bad[0]!r} is not valid UTF-8)")
    # the entries read beside data.pkl (other pickles, TorchScript code), the first of equal names
    infos: dict[str, ZipEntry] = {}
    for entry in listing.entries:
        if entry.name.endswith(".py") or entry.name.lower().endswith(".pkl"):
            infos.setdefault(entry.name, entry)
    prefix = listing.prefix
    found = listing.find(prefix + "data.pkl")
    if found is None:
        raise FormatError(f"{path}: zip archive without data.pkl (not a torch checkpoint)")
    if len(listing.entries_named(prefix + "data.pkl")) > 1:
        raise FormatError(
            f"{path}: the archive holds {len(listing.entries_named(prefix + 'data.pkl'))} entries named "
            "data.pkl (ignoring case); which one a loader reads is its zip reader's choice "
            "(run `ckpt scan` on it)"
        )
    pkl_name = found.name
    with open(path, "rb") as raw, mmap.mmap(raw.fileno(), 0, access=mmap.ACCESS_READ) as mapped:
        shared = _take_decoded(path, found)
        storages: dict[str, StorageRef] = shared.storages if shared is not None else {}
        resolve = zip_resolver(path, listing, mapped, file_size)  # type: ignore[arg-type]
        persistent_load = storage_loader(storages, resolve)
        if shared is not None:  # decoded by the scan just before, with this very loader's checks
            root = shared.root
            trace.globals.extend(shared.trace.globals)
            if trace.record_calls:
                trace.calls.extend(shared.trace.calls)
            trace.desync.extend(shared.trace.desync)
        else:
            root = _load_entry(raw, found, PickleVM(persistent_load, trace, _budget(found)), path)
        result = RawFile(path, fmt_name, file_size, root, storages, trace, [pkl_name])
        # every other pickle inside the archive is decoded too (TorchScript constants, extra entries)
        for name, info in infos.items():
            if name != pkl_name and name.lower().endswith(".pkl"):
                result.extra_pickles[name] = _load_entry(
                    raw, info, PickleVM(persistent_load, trace, _budget(info)), path
                )
                result.pickles.append(name)
        if fmt_name == fmt.TORCHSCRIPT:
            result.script_classes = script_classes(raw, infos, prefix, path)
        return result


def zip_resolver(
    path: str, listing: ZipListing, mapped: IO[bytes], file_size: int
) -> Callable[[str, str, str, int], StorageRef]:
    """``resolve`` for :func:`storage_loader` in a torch zip: the storage's entry found as torch finds
    it, its size checked against the description, its bytes placed (``mapped``: the open file)."""
    prefix = listing.prefix
    new = build_storage_ref

    def resolve(key: str, dtype: str, location: str, numel: int) -> StorageRef:
        info = listing.find(f"{prefix}data/{key}")
        if info is None:
            raise FormatError(f"{path}: storage {key} is referenced but data/{key} is missing from the archive")
        nbytes = numel * itemsize(dtype)
        if info.size < nbytes:
            raise FormatError(f"{path}: storage data/{key} holds {info.size} bytes, its description needs {nbytes}")
        offset = listing.data_start(mapped, info, path) if info.method == STORED else None
        if offset is not None and offset + nbytes > file_size:
            raise FormatError(f"{path}: storage data/{key} extends past the end of the file (truncated)")
        return new(key, dtype, location, numel, offset, nbytes, path)

    return resolve


@dataclass
class Decoded:
    """A torch archive's ``data.pkl`` decoded with :func:`read_zip`'s own storage checks, all passed."""

    root: Any
    trace: Trace
    storages: dict[str, StorageRef]


_DECODED: dict[tuple[Any, ...], Decoded] | None = None


@contextlib.contextmanager
def decodes_shared() -> Iterator[None]:
    """Inside the block, a ``data.pkl`` decoded by the scan is not decoded again by :func:`read_zip`.

    ``validate`` scans a file and then opens it: two decodes of the same pickle by the same
    interpreter, 40% of its time on a file of many tensors. The scan's walk of the archive's chosen
    ``data.pkl`` then resolves storages as :func:`read_zip` does (see :func:`offer_decoded`) and
    leaves its result here; the read that follows takes it (once) instead of decoding. A file is
    known by its path, size, modification time and inode, its entry by its header, so a file
    replaced meanwhile is decoded afresh. Nested blocks share the outer one.
    """
    global _DECODED
    if _DECODED is not None:
        yield
        return
    _DECODED = {}
    try:
        yield
    finally:
        _DECODED = None


def _decoded_key(path: str, entry: ZipEntry) -> tuple[Any, ...] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (path, st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino, entry)  # ctime: a touched-back mtime


def sharing_decodes() -> bool:
    return _DECODED is not None


def offer_decoded(path: str, entry: ZipEntry, decoded: Decoded) -> None:
    """Keep ``decoded`` (``entry`` of ``path``) for the :func:`read_zip` that follows; only the last
    file's is kept (the read follows its scan)."""
    key = _decoded_key(path, entry)
    if _DECODED is not None and key is not None:
        _DECODED.clear()
        _DECODED[key] = decoded


def data_pkl_readable(entry: ZipEntry, data: bytes) -> bool:
    """Whether :func:`read_zip` decodes these bytes of ``entry`` (its CRC checked by the caller)."""
    return entry.size <= MAX_DATA_PKL and len(data) <= MAX_DATA_PKL


def _take_decoded(path: str, entry: ZipEntry) -> Decoded | None:
    if not _DECODED:
        return None
    key = _decoded_key(path, entry)
    return _DECODED.pop(key, None) if key is not None else None


def strict_loader(path: str, listing: ZipListing, f: IO[bytes]) -> tuple[Callable[[Any], Any], dict[str, StorageRef]]:
    """:func:`read_zip`'s ``persistent_load`` for ``path`` (and the storages it fills), for a caller
    that decodes ``data.pkl`` itself and offers the result (the scan, see :func:`decodes_shared`)."""
    storages: dict[str, StorageRef] = {}
    return storage_loader(storages, zip_resolver(path, listing, f, os.path.getsize(path))), storages


MAX_SCRIPT_CODE = 16 << 20  # the text of one code/ file; far above any real module's
_CLASS_LINE = re.compile(r"^class (\w+)\(")
_MEMBERS_LINE = re.compile(r"^\s+__(parameters|buffers)__ = \[(.*)\]\s*$")


def script_classes(
    raw: IO[bytes], infos: dict[str, ZipEntry], prefix: str, path: str
) -> dict[str, tuple[set[str], set[str]]]:
    """Each TorchScript class's declared ``__parameters__`` and ``__buffers__``, read as text from ``code/``.

    The rest of a module's tensor attributes are plain attributes, which ``state_dict()`` leaves out.
    The code is only read, never run.
    """
    out: dict[str, tuple[set[str], set[str]]] = {}
    code = f"{prefix}code/"
    for name, info in infos.items():
        if not (name.startswith(code) and name.endswith(".py")):
            continue
        try:
            text = read_entry(raw, info, path, MAX_SCRIPT_CODE).decode("utf-8", "replace")
        except FormatError:
            continue  # unreadable code: its classes keep every tensor in the state dict
        module = name[len(code) : -len(".py")].replace("/", ".")
        current: tuple[set[str], set[str]] | None = None
        for line in text.splitlines():
            m = _CLASS_LINE.match(line)
            if m:
                current = (set(), set())
                out[f"{module}.{m.group(1)}"] = current
                continue
            m = _MEMBERS_LINE.match(line)
            if m and current is not None:
                names = {n.strip().strip("\"'") for n in m.group(2).split(",")} - {""}
                current[0 if m.group(1) == "parameters" else 1].update(names)
    return out


def storage_loader(
    storages: dict[str, StorageRef], resolve: Callable[[str, str, str, int], StorageRef]
) -> Callable[[Any], Any]:
    """The one ``persistent_load`` for torch's storage ids ``("storage", type, key, location, numel[, view])``.

    ``resolve(key, dtype, location, numel)`` places a storage's bytes (or refuses it); each key is
    resolved once and shared. Other persistent ids become placeholders.
    """

    dtype_of = storage_dtypes()

    def load(pid: Any) -> Any:
        if type(pid) is tuple and len(pid) == 5 and pid[0] == "storage" and type(pid[2]) is str:
            # torch's own id (nearly every one): a storage met before, or a new one of a valid size
            base = storages.get(pid[2])
            if base is not None:
                return base
            numel, storage_type = pid[4], pid[1]
            dtype = dtype_of(storage_type)
            if type(numel) is int and numel >= 0 and dtype is not None:
                base = storages[pid[2]] = resolve(pid[2], dtype, str(pid[3]), numel)
                return base
        if not (isinstance(pid, tuple) and len(pid) >= 5 and pid[0] == "storage"):
            return Placeholder("<persistent id>", (pid,))
        _, storage_type, key, location, numel = pid[:5]
        key = str(key)
        if key not in storages:
            if not isinstance(numel, int) or isinstance(numel, bool) or numel < 0:
                raise FormatError(f"storage {key} has an invalid size")
            storages[key] = resolve(key, storage_dtype(storage_type), str(location), numel)
        base = storages[key]
        view = pid[5] if len(pid) > 5 else None
        if isinstance(view, tuple) and len(view) == 3:  # very old files: storage views
            _, view_offset, view_size = view
            return StorageRef(key, base.dtype, base.location, view_size, None, view_offset, base.file)
        return base

    return load


def _budget(entry: ZipEntry) -> int:
    # the work an entry may ask for follows its bytes on disk, not what they inflate to
    return opcode_budget(entry.compressed_size)


def read_pickle_entry(raw: IO[bytes], info: ZipEntry, vm: PickleVM, path: str) -> Any:
    """Decode one pickle entry of an archive with ``vm`` (its CRC checked, its size bounded)."""
    return _load_entry(raw, info, vm, path)


def _load_entry(raw: IO[bytes], info: ZipEntry, vm: PickleVM, path: str) -> Any:
    data = read_entry(raw, info, path, MAX_DATA_PKL)
    if not crc_ok(info, data):
        # torch ignores CRCs; a reader that reports what a file holds does not trust a damaged pickle
        raise FormatError(f"{path}: zip entry {info.name!r} is corrupt (bad CRC-32)")
    try:
        return vm.load(io.BytesIO(data), len(data))
    except FormatError as exc:
        raise FormatError(f"{path}: {info.name}: {exc}") from None


def read_legacy(path: str, file_size: int, trace: Trace | None = None) -> RawFile:
    """Read the pre-1.6 torch format: five pickles in a row, then each storage's size and bytes."""
    trace = trace if trace is not None else Trace()
    storages: dict[str, StorageRef] = {}
    order: list[str] = []

    def resolve(key: str, dtype: str, location: str, numel: int) -> StorageRef:
        order.append(key)
        return StorageRef(key, dtype, location, numel, None, 0, path)

    persistent_load = storage_loader(storages, resolve)

    with open(path, "rb") as f:
        vm = PickleVM(persistent_load, trace)
        try:
            magic = vm.load(f, file_size)
            if magic != fmt.LEGACY_MAGIC:
                raise FormatError("legacy magic number missing")
            vm.load(f, file_size)  # protocol version
            vm.load(f, file_size)  # sys_info
            root = vm.load(f, file_size)
            keys = vm.load(f, file_size)
        except FormatError as exc:
            raise FormatError(f"{path}: {exc}") from None
        try:
            positions = walk_legacy_storages(f, keys, storages, file_size)
        except FormatError as exc:
            raise FormatError(f"{path}: {exc}") from None
    resolved = {}
    for key, ref in storages.items():
        if key not in positions:
            raise FormatError(f"{path}: storage {key} is referenced but not stored")
        start, nbytes = positions[key]
        resolved[key] = StorageRef(key, ref.dtype, ref.location, ref.numel, start, nbytes, path)
    _resolve_tree_storages(root, resolved)
    return RawFile(
        path, fmt.LEGACY, file_size, root, resolved, trace, ["magic", "protocol", "sys_info", "data", "keys"]
    )


def walk_legacy_storages(
    f: IO[bytes], keys: Any, storages: dict[str, StorageRef], file_size: int
) -> dict[str, tuple[int, int]]:
    """The storage records after a legacy file's fifth pickle (its list of storage keys): each an
    8-byte element count, then the bytes. Returns ``key -> (start, nbytes)``; ``f`` is left after the last."""
    if not isinstance(keys, list):
        raise FormatError("legacy storage key list is missing")
    positions: dict[str, tuple[int, int]] = {}
    for key in keys:
        key = str(key)
        head = f.read(8)
        if len(head) != 8:
            raise FormatError(f"storage {key} is missing (file truncated)")
        (count,) = struct.unpack("<q", head)
        ref = storages.get(key)
        nbytes = count * (itemsize(ref.dtype) if ref else 1)
        start = f.tell()
        if count < 0 or start + nbytes > file_size:
            raise FormatError(f"storage {key} extends past the end of the file (truncated)")
        positions[key] = (start, nbytes)
        f.seek(start + nbytes)
    return positions


def _resolve_tree_storages(root: Any, resolved: dict[str, StorageRef]) -> None:
    for tensor in walk_tensors(root, parts=True):
        if tensor.storage is not None:
            view_offset = tensor.storage.nbytes  # legacy views keep their offset (elements) in nbytes
            tensor.storage = resolved[tensor.storage.key]
            tensor.storage_offset += view_offset


def read_pickle(path: str, file_size: int, trace: Trace | None = None) -> RawFile:
    """Read a plain pickle (``pickle.dump`` of a dict, say) into inert data."""
    trace = trace if trace is not None else Trace()
    with open(path, "rb") as f:
        try:
            root = PickleVM(None, trace).load(f, file_size)
        except FormatError as exc:
            raise FormatError(f"{path}: not a readable pickle ({exc})") from None
    return RawFile(path, fmt.PICKLE, file_size, root, {}, trace, ["pickle"])
