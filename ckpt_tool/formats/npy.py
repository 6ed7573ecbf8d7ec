"""numpy's ``.npy``: a magic string, a header that is a Python dict literal, then the array's bytes.

An array of Python objects (dtype ``O``) is stored as a pickle after the header, which
``numpy.load(allow_pickle=True)`` unpickles; every other dtype is raw data.
"""

from __future__ import annotations

import math
import struct
from typing import IO, Any, NamedTuple

from ..errors import FormatError

MAGIC = b"\x93NUMPY"
MAX_HEADER = 1 << 20


class NpyHeader(NamedTuple):
    version: tuple[int, int]
    descr: Any
    shape: tuple[int, ...]
    data_offset: int
    itemsize: int | None  # None: an object dtype, the data is a pickle

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * (self.itemsize or 0)


def read_header(f: IO[bytes]) -> NpyHeader:
    """The header at the start of ``f`` (read with ``ast.literal_eval``: literals only, nothing runs)."""
    head = f.read(8)
    if len(head) != 8 or not head.startswith(MAGIC):
        raise FormatError("not a .npy file (magic string missing)")
    major, minor = head[6], head[7]
    if major == 1:
        size_field = f.read(2)
        (length,) = struct.unpack("<H", size_field) if len(size_field) == 2 else (-1,)
    elif major in (2, 3):
        size_field = f.read(4)
        (length,) = struct.unpack("<I", size_field) if len(size_field) == 4 else (-1,)
    else:
        raise FormatError(f".npy format version {major}.{minor} is unknown")
    if length < 0 or length > MAX_HEADER:
        raise FormatError(f".npy header length {length} is missing or over the {MAX_HEADER}-byte limit")
    raw = f.read(length)
    if len(raw) != length:
        raise FormatError(".npy header is truncated")
    import ast  # only for .npy files

    try:
        header = ast.literal_eval(raw.decode("utf-8" if major == 3 else "latin-1"))
    except (SyntaxError, ValueError, TypeError, RecursionError, MemoryError, UnicodeDecodeError) as exc:
        raise FormatError(f".npy header is not a Python literal ({type(exc).__name__})") from None
    if not (isinstance(header, dict) and {"descr", "shape"} <= set(header)):
        raise FormatError(".npy header is not a dict with 'descr' and 'shape'")
    shape = header["shape"]
    if not (isinstance(shape, tuple) and all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape)):
        raise FormatError(f".npy shape {shape!r} is not a tuple of non-negative integers")
    return NpyHeader((major, minor), header["descr"], shape, f.tell(), itemsize(header["descr"]))


def itemsize(descr: Any, depth: int = 0) -> int | None:
    """Bytes per item of a dtype description ('<f4', '|U5', a structured list); None for objects."""
    if depth > 32:
        raise FormatError(".npy dtype nests too deeply")
    if isinstance(descr, str):
        code = descr.lstrip("<>|=")
        kind, digits = code[:1], code[1:].split("[", 1)[0]
        if kind == "O":
            return None
        if kind in ("M", "m") and not digits:
            return 8
        if kind == "?" or (kind == "b" and not digits):
            return 1
        if not digits.isdigit():
            raise FormatError(f".npy dtype {descr!r} is unknown")
        return int(digits) * (4 if kind == "U" else 1)
    if isinstance(descr, list):
        total = 0
        for field in descr:
            if not (isinstance(field, tuple) and len(field) in (2, 3)):
                raise FormatError(f".npy structured dtype field {field!r} is malformed")
            size = itemsize(field[1], depth + 1)
            if size is None:
                return None
            count = field[2] if len(field) == 3 else ()
            count = (count,) if isinstance(count, int) else count
            if not (isinstance(count, tuple) and all(isinstance(c, int) and c >= 0 for c in count)):
                raise FormatError(f".npy structured dtype field {field!r} is malformed")
            total += size * math.prod(count)
        return total
    raise FormatError(f".npy dtype {descr!r} is unknown")
