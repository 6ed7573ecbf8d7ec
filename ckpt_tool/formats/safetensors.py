"""The safetensors header: read, and checked against the file it describes."""

from __future__ import annotations

import collections
import contextlib
import json
import math
import os
import struct
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from typing import Any

from ..checkpoint import DENSE, DTYPES, SAFETENSORS_TO_DTYPE, TensorRef, build_ref, contiguous_strides
from ..errors import FormatError

MAX_HEADER = 100 * 1024 * 1024  # the safetensors library's own bound
# dtype codes every safetensors release since 0.3 loads into torch; others are asked of the installed one
BASE_CODES = frozenset({"F64", "F32", "F16", "BF16", "I64", "I32", "I16", "I8", "U8", "BOOL"})
_LOADABLE: dict[str, bool] = {}


def loadable(code: str) -> bool:
    """Whether the installed safetensors loads a tensor of dtype ``code`` into torch (``C128`` never does).

    Codes outside the base set are tried for real, once per installed safetensors and torch: a
    one-element file of that dtype is written to a temporary directory and read back with
    ``safe_open(framework="pt")`` (which imports torch), the way ``load_file`` reads. The answer is
    kept in the cache (``safetensors-dtypes.json``, keyed by both versions), so the next run answers
    without importing torch. Without safetensors installed nothing can be asked, and no code is
    called unloadable.
    """
    if code in BASE_CODES:
        return True
    if code not in _LOADABLE:
        _LOADABLE[code] = _cached_probe(code)
    return _LOADABLE[code]


def _versions() -> str | None:
    """``"safetensors X, torch Y"`` for the installed pair (read from their metadata: nothing imported)."""
    from importlib import metadata

    try:
        found = metadata.version("safetensors")
    except metadata.PackageNotFoundError:
        return None
    try:
        torch = metadata.version("torch")
    except metadata.PackageNotFoundError:
        torch = "none"
    return f"safetensors {found}, torch {torch}"


def _cached_probe(code: str) -> bool:
    from ..cache import cache_root, read_cached, write_cached

    versions = _versions()
    if versions is None:
        return True
    path = os.path.join(cache_root(), "safetensors-dtypes.json")
    key = {"kind": "safetensors-dtypes", "installed": versions}
    answers, _ = read_cached(path, key)  # another pair of versions, or a damaged file: asked afresh
    answers = dict(answers) if isinstance(answers, dict) else {}
    if isinstance(answers.get(code), bool):
        return bool(answers[code])
    answers[code] = _try_load(code)
    write_cached(path, key, answers)
    return bool(answers[code])


def _try_load(code: str) -> bool:
    import tempfile

    dtype = SAFETENSORS_TO_DTYPE.get(code)
    if dtype is None:
        return False
    size = DTYPES[dtype][0]
    header = json.dumps({"x": {"dtype": code, "shape": [1], "data_offsets": [0, size]}}).encode()
    header += b" " * (-len(header) % 8)
    try:
        from safetensors import safe_open

        with tempfile.TemporaryDirectory() as tmp:
            probe = os.path.join(tmp, "probe.safetensors")
            with open(probe, "wb") as f:
                f.write(struct.pack("<Q", len(header)) + header + bytes(size))
            with safe_open(probe, framework="pt") as st:
                st.get_tensor("x")
    except Exception:  # noqa: BLE001 - any failure means this safetensors cannot load the dtype
        return False
    return True


def unloadable_reason(code: str) -> str:
    try:
        from importlib.metadata import version

        installed = f"safetensors {version('safetensors')}"
    except Exception:  # noqa: BLE001 - the version is only for the message
        installed = "the installed safetensors"
    return f"dtype {code} cannot be loaded by {installed}"


@dataclass
class SafetensorsHeader:
    path: str
    file_size: int
    data_start: int
    tensors: dict[str, TensorRef]
    metadata: dict[str, str] = field(default_factory=dict)
    elements: int = 0  # the tensors' elements in all (counted as the header is checked)


_Found = tuple[SafetensorsHeader | None, list[Any]]  # defects: messages, and (key, code) to ask loadable() about
_MEMO: collections.OrderedDict[tuple[Any, ...], _Found] | None = None
MEMO_FILES = 4  # the walk, the scan and the load of one file follow each other


@contextlib.contextmanager
def headers_memoized() -> Iterator[None]:
    """Inside the block a file's header is parsed once for the checks that follow each other.

    ``validate`` of a directory asks for a shard's header when it walks the directory, when it
    scans the shard and when it loads it. The last few files are kept (not all: a 163-shard set's
    headers would double the peak memory). A file is known by its path, size, modification time
    and inode, so a file replaced meanwhile is read afresh. Nested blocks share the outer memo.
    """
    global _MEMO
    if _MEMO is not None:
        yield
        return
    _MEMO = collections.OrderedDict()
    try:
        yield
    finally:
        _MEMO = None


def header_defects(path: str, check_loadable: bool = True) -> tuple[SafetensorsHeader | None, list[str]]:
    """Check a safetensors file's header against the file. Returns the header and every defect found.

    The header is returned only when it could be parsed; tensors with defects are left out of it.
    A dtype the installed safetensors cannot load (``C128``, which older ckpt wrote) is a defect
    unless ``check_loadable`` is False (describing such a file still works, and asks nothing).
    """
    header, found = _memoized(path)
    defects = []
    for d in found:
        if isinstance(d, str):
            defects.append(d)
        elif check_loadable and not loadable(d[1]):
            defects.append(f"tensor {d[0]!r}: {unloadable_reason(d[1])}")
    return header, defects


def _memoized(path: str) -> _Found:
    memo = _MEMO
    if memo is None:
        return _header_defects(path)
    try:
        st = os.stat(path)
    except OSError:
        return _header_defects(path)
    key = (os.path.abspath(path), st.st_size, st.st_mtime_ns, st.st_ino)
    if key in memo:
        memo.move_to_end(key)
    else:
        memo[key] = _header_defects(path)
        while len(memo) > MEMO_FILES:
            memo.popitem(last=False)
    header, found = memo[key]
    # each caller gets its own containers: nothing one of them changes reaches the next
    if header is not None:
        header = replace(header, tensors=dict(header.tensors), metadata=dict(header.metadata))
    return header, found


def _header_defects(path: str) -> _Found:
    defects: list[Any] = []
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                return None, [f"file is {size} bytes, shorter than the 8-byte header length"]
            (n,) = struct.unpack("<Q", head)
            if n > MAX_HEADER:
                return None, [f"header length {n} is over the {MAX_HEADER}-byte limit"]
            if 8 + n > size:
                return None, [f"header length {n} runs past the end of the {size}-byte file (truncated?)"]
            raw = f.read(n)
    except OSError as exc:
        return None, [f"cannot be read ({exc.strerror or exc})"]
    try:
        header = parse_json(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        return None, [f"header is not valid JSON ({exc})"]
    except RecursionError:
        return None, ["header JSON nests too deeply to be a safetensors header"]
    if not isinstance(header, dict):
        return None, ["header is not a JSON object"]
    data_start = 8 + n
    data_len = size - data_start
    metadata: dict[str, str] = {}
    meta = header.pop("__metadata__", None)
    if meta is not None:
        if isinstance(meta, dict) and all(isinstance(k, str) and isinstance(v, str) for k, v in meta.items()):
            metadata = meta
        else:
            defects.append("__metadata__ must map strings to strings")
    refs: dict[str, TensorRef] = {}  # in the header's order
    elements = 0
    skipped = False  # an entry left out for a defect of its own
    strides: dict[tuple[int, ...], tuple[int, ...]] = {}
    storage = path + "#"
    # every tensor begins where the one before it ends, none of them empty (as the writers lay
    # them out): already in the order of their bytes, no overlap and no gap between them
    cursor, abutting = 0, True
    new = build_ref
    for key in list(header):
        entry = header.pop(key)  # each entry freed once read: the parsed header and the refs are not both held
        # the checks of _entry_defect, inlined for the well-formed entry (100,000 of them take
        # a fraction of a second); any doubt and _entry_defect says what is wrong
        try:
            code, dims, (begin, end) = entry["dtype"], entry["shape"], entry["data_offsets"]
            dtype, item = _DTYPE_SIZE[code]
            ok = type(dims) is list and type(begin) is int and type(end) is int and 0 <= begin <= end <= data_len
            if ok:
                for d in dims:
                    if type(d) is not int or d < 0:
                        ok = False
                        break
            numel = math.prod(dims) if ok else 0
            ok = ok and end - begin == numel * item
        except (TypeError, KeyError, ValueError):
            ok = False
        if not ok:
            problem = _entry_defect(key, entry, data_len)
            if problem:
                defects.append(problem)
                skipped = True
                continue
            code, dims, (begin, end) = entry["dtype"], entry["shape"], entry["data_offsets"]
            dtype = SAFETENSORS_TO_DTYPE[code]
            numel = math.prod(dims)
        if code not in BASE_CODES:
            defects.append((key, code))  # judged by header_defects, when its caller asks
        shape = tuple(dims)
        stride = strides.get(shape)
        if stride is None:
            stride = strides[shape] = contiguous_strides(shape)
        refs[key] = new(
            key, dtype, shape, stride, storage + key, 0, end - begin, data_start + begin, path, False, DENSE, (), (), ""
        )
        elements += numel
        if abutting:
            abutting = begin == cursor and end > begin
            cursor = end
    overlaps: list[str] = []
    gaps: list[str] = []
    if not abutting:  # put in the order of their bytes (keys are unique: a ref itself is never compared)
        spans: list[tuple[int, int, str, TensorRef]] = []
        for key, ref in refs.items():
            begin = (ref.data_offset or 0) - data_start
            spans.append((begin, begin + ref.storage_nbytes, key, ref))
        spans.sort()
        # tensors follow the order of their bytes in the file, as the writer laid them out
        refs = {key: ref for _, _, key, ref in spans}
        cursor = 0
        for begin, end, key, _ in spans:
            if begin < cursor:
                overlaps.append(f"tensor {key!r} overlaps the bytes of another tensor (offset {begin})")
            elif begin > cursor:
                gaps.append(f"{begin - cursor} bytes before tensor {key!r} belong to no tensor (offset {cursor})")
            cursor = max(cursor, end)
    if cursor < data_len:
        gaps.append(f"{data_len - cursor} bytes after the last tensor belong to no tensor")
    defects += overlaps
    # bytes a broken or overlapping entry should have held are a gap because of that entry: the
    # defect is said once, and a gap only stands on its own when every entry is in place
    if not (skipped or overlaps):
        defects += gaps
    return SafetensorsHeader(path, size, data_start, refs, metadata, elements), defects


_DTYPE_SIZE = {code: (name, DTYPES[name][0]) for code, name in SAFETENSORS_TO_DTYPE.items()}


def parse_json(raw: bytes) -> Any:
    """A header's or an index's JSON: orjson reads it (several times faster than json on 100,000
    entries); what it refuses (NaN, deep nesting), json reads or explains (``UnicodeDecodeError``,
    ``json.JSONDecodeError``, ``RecursionError``) as before. orjson reads an integer beyond 64 bits
    as a float: a text with a run of 19 digits or more (where one may be) is json's to read."""
    import orjson

    if raw.translate(_DIGITS).find(_LONG_RUN) < 0:
        try:
            return orjson.loads(raw)
        except orjson.JSONDecodeError:
            pass
    return json.loads(raw.decode("utf-8"))


_DIGITS = bytes(0x30 if 0x30 <= c <= 0x39 else 0x78 for c in range(256))  # each digit 0, any other byte x
_LONG_RUN = b"0" * 19  # a shorter integer is within orjson's 64 bits (-2**63 to 2**64 - 1)


def _entry_defect(key: str, entry: Any, data_len: int) -> str | None:
    if not isinstance(entry, dict):
        return f"tensor {key!r}: entry is not an object"
    dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
    if dtype not in SAFETENSORS_TO_DTYPE:
        return f"tensor {key!r}: unknown dtype {dtype!r}"
    if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape):
        return f"tensor {key!r}: shape {shape!r} is not a list of non-negative integers"
    if not (
        isinstance(offsets, list)
        and len(offsets) == 2
        and all(isinstance(o, int) and not isinstance(o, bool) for o in offsets)
    ):
        return f"tensor {key!r}: data_offsets {offsets!r} is not a pair of integers"
    begin, end = offsets
    if begin < 0 or end < begin:
        return f"tensor {key!r}: data_offsets [{begin}, {end}] are out of order"
    want = math.prod(shape) * DTYPES[SAFETENSORS_TO_DTYPE[dtype]][0]
    if end - begin != want:
        return f"tensor {key!r}: shape {shape} of {dtype} needs {want} bytes but data_offsets span {end - begin}"
    if end > data_len:
        return f"tensor {key!r}: data_offsets end at {end}, past the {data_len} bytes of data (truncated?)"
    return None


def read_safetensors(path: str) -> SafetensorsHeader:
    """Read a safetensors header, raising :class:`FormatError` on the first defect."""
    header, defects = header_defects(path, check_loadable=False)
    if defects or header is None:
        raise FormatError(f"{path}: {defects[0] if defects else 'unreadable safetensors header'}")
    return header
