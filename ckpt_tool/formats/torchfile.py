"""Readers for torch's own files: the zip archive (and TorchScript), the legacy format, plain pickles.

Each returns a :class:`RawFile`: the decoded object tree (with :class:`PickledTensor` leaves), the
storages with their byte positions, and the trace of what the pickles asked for.
"""

from __future__ import annotations

import io
import re
import struct
import zipfile
from dataclasses import dataclass, field
from typing import IO, Any

from ..errors import FormatError, InputError
from ..model import itemsize
from . import sniff as fmt
from .pickle_vm import PickleVM, Placeholder, StorageRef, Trace, storage_dtype, walk_tensors

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


def _local_data_offset(stream: IO[bytes], info: zipfile.ZipInfo) -> int:
    stream.seek(info.header_offset)
    header = stream.read(30)
    if len(header) != 30 or header[:4] != b"PK\x03\x04":
        raise FormatError(f"zip entry {info.filename!r} has a bad local header")
    name_len, extra_len = struct.unpack("<HH", header[26:30])
    offset: int = info.header_offset + 30 + name_len + extra_len
    return offset


def read_zip(path: str, file_size: int, trace: Trace | None = None, fmt_name: str = fmt.ZIP) -> RawFile:
    """Read a torch zip archive (``torch.save`` since 1.6, TorchScript) without its tensor bytes."""
    trace = trace if trace is not None else Trace()
    try:
        zf = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, ValueError, EOFError) as exc:  # ValueError: undecodable entry names
        raise FormatError(f"{path}: corrupt zip archive ({exc})") from None
    except OSError as exc:
        raise InputError(f"{path}: cannot be read ({exc.strerror or exc})") from None
    with zf, open(path, "rb") as raw:
        infos = {i.filename: i for i in zf.infolist()}
        pkl_names = [n for n in infos if n == "data.pkl" or n.endswith("/data.pkl")]
        if not pkl_names:
            raise FormatError(f"{path}: zip archive without data.pkl (not a torch checkpoint)")
        pkl_name = min(pkl_names, key=len)
        prefix = pkl_name[: -len("data.pkl")]
        storages: dict[str, StorageRef] = {}

        def persistent_load(pid: Any) -> Any:
            if not (isinstance(pid, tuple) and len(pid) >= 5 and pid[0] == "storage"):
                return Placeholder("<persistent id>", (pid,))
            _, storage_type, key, location, numel = pid[:5]
            key = str(key)
            if key in storages:
                return storages[key]
            dtype = storage_dtype(storage_type)
            if not isinstance(numel, int) or numel < 0:
                raise FormatError(f"storage {key} has an invalid size")
            info = infos.get(f"{prefix}data/{key}")
            if info is None:
                raise FormatError(f"{path}: storage {key} is referenced but data/{key} is missing from the archive")
            nbytes = numel * itemsize(dtype)
            if info.file_size < nbytes:
                raise FormatError(
                    f"{path}: storage data/{key} holds {info.file_size} bytes, its description needs {nbytes}"
                )
            offset = _local_data_offset(raw, info) if info.compress_type == zipfile.ZIP_STORED else None
            if offset is not None and offset + nbytes > file_size:
                raise FormatError(f"{path}: storage data/{key} extends past the end of the file (truncated)")
            ref = StorageRef(key, dtype, str(location), numel, offset, nbytes, path)
            storages[key] = ref
            return ref

        root = _load_entry(zf, infos[pkl_name], PickleVM(persistent_load, trace), path)
        result = RawFile(path, fmt_name, file_size, root, storages, trace, [pkl_name])
        # every other pickle inside the archive is decoded too (TorchScript constants, extra entries)
        for name, info in infos.items():
            if name != pkl_name and name.endswith(".pkl"):
                result.extra_pickles[name] = _load_entry(zf, info, PickleVM(persistent_load, trace), path)
                result.pickles.append(name)
        if fmt_name == fmt.TORCHSCRIPT:
            result.script_classes = script_classes(zf, infos, prefix)
        return result


MAX_SCRIPT_CODE = 16 << 20  # the text of one code/ file; far above any real module's
_CLASS_LINE = re.compile(r"^class (\w+)\(")
_MEMBERS_LINE = re.compile(r"^\s+__(parameters|buffers)__ = \[(.*)\]\s*$")


def script_classes(zf: zipfile.ZipFile, infos: dict[str, zipfile.ZipInfo], prefix: str
                   ) -> dict[str, tuple[set[str], set[str]]]:
    """Each TorchScript class's declared ``__parameters__`` and ``__buffers__``, read as text from ``code/``.

    The rest of a module's tensor attributes are plain attributes, which ``state_dict()`` leaves out.
    The code is only read, never run.
    """
    out: dict[str, tuple[set[str], set[str]]] = {}
    code = f"{prefix}code/"
    for name, info in infos.items():
        if not (name.startswith(code) and name.endswith(".py")) or info.file_size > MAX_SCRIPT_CODE:
            continue
        try:
            text = zf.read(info).decode("utf-8", "replace")
        except (zipfile.BadZipFile, EOFError, OSError, ValueError, NotImplementedError):
            continue  # unreadable code: its classes keep every tensor in the state dict
        module = name[len(code):-len(".py")].replace("/", ".")
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


def _load_entry(zf: zipfile.ZipFile, info: zipfile.ZipInfo, vm: PickleVM, path: str) -> Any:
    if info.file_size > MAX_DATA_PKL:
        raise FormatError(f"{path}: {info.filename} claims {info.file_size} bytes")
    try:
        data = zf.read(info)
    except (zipfile.BadZipFile, EOFError, OSError, ValueError, NotImplementedError) as exc:
        raise FormatError(f"{path}: zip entry {info.filename!r} is corrupt ({exc})") from None
    try:
        return vm.load(io.BytesIO(data), len(data))
    except FormatError as exc:
        raise FormatError(f"{path}: {info.filename}: {exc}") from None


def read_legacy(path: str, file_size: int, trace: Trace | None = None) -> RawFile:
    """Read the pre-1.6 torch format: five pickles in a row, then each storage's size and bytes."""
    trace = trace if trace is not None else Trace()
    storages: dict[str, StorageRef] = {}
    order: list[str] = []

    def persistent_load(pid: Any) -> Any:
        if not (isinstance(pid, tuple) and len(pid) >= 5 and pid[0] == "storage"):
            return Placeholder("<persistent id>", (pid,))
        _, storage_type, key, location, numel = pid[:5]
        key = str(key)
        if key not in storages:
            if not isinstance(numel, int) or numel < 0:
                raise FormatError(f"storage {key} has an invalid size")
            storages[key] = StorageRef(key, storage_dtype(storage_type), str(location), numel, None, 0, path)
            order.append(key)
        base = storages[key]
        view = pid[5] if len(pid) > 5 else None
        if isinstance(view, tuple) and len(view) == 3:  # very old files: storage views
            _, view_offset, view_size = view
            return StorageRef(key, base.dtype, base.location, view_size, None, view_offset, path)
        return base

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
        if not isinstance(keys, list):
            raise FormatError(f"{path}: legacy storage key list is missing")
        positions: dict[str, tuple[int, int]] = {}
        for key in keys:
            key = str(key)
            head = f.read(8)
            if len(head) != 8:
                raise FormatError(f"{path}: storage {key} is missing (file truncated)")
            (count,) = struct.unpack("<q", head)
            ref = storages.get(key)
            size = itemsize(ref.dtype) if ref else 1
            start = f.tell()
            if count < 0 or start + count * size > file_size:
                raise FormatError(f"{path}: storage {key} extends past the end of the file (truncated)")
            positions[key] = (start, count * size)
            f.seek(start + count * size)
    resolved = {}
    for key, ref in storages.items():
        if key not in positions:
            raise FormatError(f"{path}: storage {key} is referenced but not stored")
        start, nbytes = positions[key]
        resolved[key] = StorageRef(key, ref.dtype, ref.location, ref.numel, start, nbytes, path)
    _resolve_tree_storages(root, resolved)
    return RawFile(path, fmt.LEGACY, file_size, root, resolved, trace, ["magic", "protocol", "sys_info", "data", "keys"])


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
