"""Tensor values, read only when a command needs them: streamed, tensor by tensor, without torch.

numpy does the arithmetic; bfloat16 and float8 are widened to float32 chunk by chunk.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator
from dataclasses import dataclass, replace
from typing import IO, Any

from .checkpoint import QUANTIZED, SPARSE_KINDS, TensorRef, itemsize
from .errors import FormatError, InputError

CHUNK_BYTES = 16 * 1024 * 1024
# how many bytes a strided view may produce beyond the bytes it reads (broadcast views repeat them)
MAX_EXPANSION = 1 << 30

_NUMPY_DTYPES = {
    "float64": "<f8",
    "float32": "<f4",
    "float16": "<f2",
    "int64": "<i8",
    "int32": "<i4",
    "int16": "<i2",
    "int8": "i1",
    "uint64": "<u8",
    "uint32": "<u4",
    "uint16": "<u2",
    "uint8": "u1",
    "bool": "?",
    "complex64": "<c8",
    "complex128": "<c16",
    "bfloat16": "<u2",
    "qint8": "i1",
    "quint8": "u1",
    "qint32": "<i4",
    "float8_e4m3fn": "u1",
    "float8_e5m2": "u1",
    "float8_e4m3fnuz": "u1",
    "float8_e5m2fnuz": "u1",
    "float8_e8m0fnu": "u1",
}
# float8 dtypes -> (exponent bits, mantissa bits, bias, variant); widened to float32 through a table
_FLOAT8 = {
    "float8_e4m3fn": (4, 3, 7, "fn"),
    "float8_e5m2": (5, 2, 15, "ieee"),
    "float8_e4m3fnuz": (4, 3, 8, "fnuz"),
    "float8_e5m2fnuz": (5, 2, 16, "fnuz"),
    "float8_e8m0fnu": (8, 0, 127, "e8m0"),
}


class FileCache:
    """Open files shared by the reads of one command (a sharded checkpoint spans several)."""

    def __init__(self) -> None:
        self._files: dict[str, IO[bytes]] = {}

    def get(self, path: str) -> IO[bytes]:
        f = self._files.get(path)
        if f is None:
            try:
                f = open(path, "rb")
            except OSError as exc:
                raise InputError(f"{path}: cannot be read ({exc.strerror or exc})") from None
            self._files[path] = f
        return f

    def close(self) -> None:
        for f in self._files.values():
            f.close()
        self._files.clear()

    def __enter__(self) -> FileCache:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _read_exact(f: IO[bytes], offset: int, n: int, ref: TensorRef) -> bytes:
    f.seek(offset)
    data = f.read(n)
    if len(data) != n:
        raise FormatError(f"{ref.file}: tensor {ref.key!r} is truncated ({len(data)} of {n} bytes)")
    return data


def has_bytes(ref: TensorRef) -> bool:
    """Whether the tensor's values can be read: a byte range of its file, or a DCP tensor's chunks."""
    return ref.offset is not None or (bool(ref.attrs) and ref.attrs[0][0] == "dcp_chunks")


def iter_raw_chunks(ref: TensorRef, files: FileCache, chunk_bytes: int = CHUNK_BYTES) -> Iterator[bytes]:
    """The tensor's bytes in C order, in chunks of about ``chunk_bytes``; contiguous views are copied as is."""
    if ref.offset is None and has_bytes(ref):
        from .formats.dcp import iter_gathered  # a DCP tensor of several chunks

        yield from iter_gathered(ref, files, chunk_bytes)
        return
    if ref.offset is None:
        raise FormatError(f"{ref.file}: tensor {ref.key!r} has no stored bytes (meta or compressed entry)")
    f = files.get(ref.file)
    if ref.is_contiguous:
        remaining = ref.nbytes
        pos = ref.offset
        step = max(itemsize(ref.dtype), chunk_bytes - chunk_bytes % itemsize(ref.dtype))
        while remaining > 0:
            n = min(step, remaining)
            yield _read_exact(f, pos, n, ref)
            pos += n
            remaining -= n
        return
    # a strided view: read the span it touches, then gather its elements, a block of rows at a time
    import numpy as np

    size = itemsize(ref.dtype)
    span_bytes = ref.span_elements * size
    if ref.nbytes > span_bytes + MAX_EXPANSION:
        # a broadcast (stride 0) view may repeat a few stored bytes without bound: refuse, not hang
        raise FormatError(
            f"{ref.file}: tensor {ref.key!r} expands {span_bytes} stored bytes to {ref.nbytes} "
            "(a broadcast view); refusing to materialise it"
        )
    span = _read_exact(f, ref.offset, span_bytes, ref)
    raw = np.frombuffer(span, dtype=np.dtype(f"V{size}"))
    view = np.lib.stride_tricks.as_strided(raw, shape=ref.shape, strides=tuple(s * size for s in ref.stride))
    rows = max(1, chunk_bytes // max(1, ref.nbytes // ref.shape[0])) if ref.shape else 1
    for start in range(0, ref.shape[0] if ref.shape else 1, rows):
        block = view[start : start + rows] if ref.shape else view
        yield np.ascontiguousarray(block).tobytes()


def read_bytes(ref: TensorRef, files: FileCache) -> bytes:
    """All of a tensor's bytes in C order (memory: the tensor's size)."""
    return b"".join(iter_raw_chunks(ref, files, max(ref.nbytes, 1)))


def to_numpy(data: bytes, dtype: str) -> Any:
    """A flat numpy array of ``data``; bfloat16 and float8 come back widened to float32."""
    import numpy as np

    code = _NUMPY_DTYPES.get(dtype)
    if code is None:
        raise FormatError(f"values of dtype {dtype} cannot be read")
    arr = np.frombuffer(data, dtype=np.dtype(code))
    if dtype == "bfloat16":
        return (arr.astype(np.uint32) << 16).view(np.float32)
    if dtype in _FLOAT8:
        return _float8_table(dtype)[arr]
    return arr


def read_array(ref: TensorRef, files: FileCache) -> Any:
    """The tensor as a numpy array of its shape (bfloat16/float8 widened to float32)."""
    return to_numpy(read_bytes(ref, files), ref.dtype).reshape(ref.shape)


_F8: dict[str, Any] = {}


def _float8_table(dtype: str) -> Any:
    """The 256 values of a float8 dtype as float32, decoded from the bit layout torch uses."""
    import numpy as np

    if dtype not in _F8:
        exp_bits, man_bits, bias, variant = _FLOAT8[dtype]
        out = np.zeros(256, dtype=np.float32)
        for b in range(256):
            if variant == "e8m0":  # unsigned powers of two; 0xff is NaN
                out[b] = math.nan if b == 0xFF else 2.0 ** (b - bias)
                continue
            sign = -1.0 if b & 0x80 else 1.0
            e = (b >> man_bits) & ((1 << exp_bits) - 1)
            m = b & ((1 << man_bits) - 1)
            top = (1 << exp_bits) - 1
            if variant == "fnuz" and b == 0x80:  # the only NaN; no negative zero, no infinities
                out[b] = math.nan
            elif variant == "fn" and e == top and m == (1 << man_bits) - 1:
                out[b] = math.nan
            elif variant == "ieee" and e == top:
                out[b] = math.inf * sign if m == 0 else math.nan
            elif e == 0:
                out[b] = sign * (m / (1 << man_bits)) * 2.0 ** (1 - bias)
            else:
                out[b] = sign * (1 + m / (1 << man_bits)) * 2.0 ** (e - bias)
        _F8[dtype] = out
    return _F8[dtype]


@dataclass(frozen=True)
class TensorStats:
    key: str
    min: float | None
    max: float | None
    mean: float | None
    std: float | None
    nan: int
    inf: int


def tensor_stats(ref: TensorRef, files: FileCache) -> TensorStats:
    """min/max/mean/std and NaN/Inf counts, streamed in chunks (memory: one chunk).

    ``std`` is torch's default, the unbiased (n - 1) one: nan for a single finite value. NaN and
    Inf are counted and left out of the other figures. A per-tensor quantized tensor is described
    by its dequantized values ``(q - zero_point) * scale``; complex values by their magnitude.
    """
    import numpy as np

    a = ref.attr
    if ref.kind == QUANTIZED and "scale" not in a:
        return TensorStats(ref.key, None, None, None, None, 0, 0)  # per-channel: scales live elsewhere
    count = nan = inf = 0
    mean = m2 = 0.0
    lo, hi = math.inf, -math.inf
    for chunk in iter_raw_chunks(ref, files):
        arr = to_numpy(chunk, ref.dtype)
        if arr.dtype.kind == "c":
            arr = np.abs(arr)
        arr = arr.astype(np.float64, copy=False)
        if ref.kind == QUANTIZED:
            arr = (arr - a.get("zero_point", 0)) * a["scale"]
        bad_nan = np.isnan(arr)
        bad_inf = np.isinf(arr)
        nan += int(bad_nan.sum())
        inf += int(bad_inf.sum())
        good = arr[~(bad_nan | bad_inf)] if (nan or inf) else arr
        if good.size:
            lo = min(lo, float(good.min()))
            hi = max(hi, float(good.max()))
            # Chan's merge of (count, mean, sum of squared deviations): stable for large means
            n, chunk_mean = good.size, float(good.mean())
            chunk_m2 = float(np.square(good - chunk_mean).sum())
            delta = chunk_mean - mean
            total = count + n
            mean += delta * n / total
            m2 += chunk_m2 + delta * delta * count * n / total
            count = total
    if count == 0:
        return TensorStats(ref.key, None, None, None, None, nan, inf)
    std = math.sqrt(max(m2, 0.0) / (count - 1)) if count > 1 else math.nan
    return TensorStats(ref.key, lo, hi, mean, std, nan, inf)


def file_size(path: str) -> int:
    return os.path.getsize(path)


def to_torch(ref: TensorRef, files: FileCache) -> Any:
    """The tensor as a contiguous CPU ``torch.Tensor`` (imports torch; memory: the tensor's size)."""
    import torch

    dtype = getattr(torch, ref.dtype, None)
    if not isinstance(dtype, torch.dtype):
        raise FormatError(f"{ref.file}: tensor {ref.key!r} has dtype {ref.dtype}, which this torch lacks")
    if ref.numel == 0:
        return torch.empty(ref.shape, dtype=dtype)
    data = bytearray(read_bytes(ref, files))
    return torch.frombuffer(data, dtype=torch.uint8).view(dtype).reshape(ref.shape)


# the integer type that holds each quantized dtype's values
_INT_REPR = {"qint8": "int8", "quint8": "uint8", "qint32": "int32"}


def composite_to_torch(ref: TensorRef, files: FileCache) -> Any:
    """A sparse or quantized tensor as the torch tensor it was saved from (imports torch).

    Quantized: its integer values with the scale and zero point (or per-channel scales); sparse:
    its indices and values in its layout. Dense tensors come back as :func:`to_torch` gives them.
    """
    import warnings

    import torch

    if ref.kind not in SPARSE_KINDS and ref.kind != QUANTIZED:
        return to_torch(ref, files)
    parts = {name: to_torch(p, files) for name, p in ref.parts}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch's notes on deprecated quantized and beta sparse tensors
        if ref.kind == QUANTIZED:
            if ref.dtype not in _INT_REPR:
                raise FormatError(f"{ref.file}: tensor {ref.key!r}: quantized {ref.dtype} values cannot be read")
            ints = to_torch(replace(ref, dtype=_INT_REPR[ref.dtype], kind="dense", parts=(), attrs=()), files)
            a = ref.attr
            if "scale" in a:
                return torch._make_per_tensor_quantized_tensor(ints, a["scale"], a["zero_point"])
            return torch._make_per_channel_quantized_tensor(ints, parts["scales"], parts["zero_points"], a["axis"])
        values = parts.pop("values")
        indices = list(parts.values())
        if ref.kind == "sparse_coo":
            return torch.sparse_coo_tensor(indices[0], values, ref.shape)
        return torch.sparse_compressed_tensor(
            indices[0], indices[1], values, ref.shape, layout=getattr(torch, ref.kind)
        )


def compare_composite(a: TensorRef, b: TensorRef, files: FileCache) -> tuple[float, float]:
    """``(max |a - b|, ||a - b|| / ||a||)`` of what two tensors mean, when either is sparse or quantized.

    Quantized tensors compare by their dequantized values (a changed scale is a change even when
    the stored integers are equal); sparse ones by their dense values.
    """
    import torch

    def dense(ref: TensorRef) -> Any:
        t = composite_to_torch(ref, files)
        t = t.dequantize() if t.is_quantized else t.to_dense() if t.layout != torch.strided else t
        return t.to(torch.complex128 if t.is_complex() else torch.float64)

    x, y = dense(a), dense(b)
    d = (x - y).abs()
    both_nan = x.isnan() & y.isnan()
    d[both_nan] = 0
    if d.isnan().any():
        return math.nan, math.nan
    ref_norm = float(x.abs().where(~both_nan, 0).square().sum())
    diff_sq = float(d.square().sum())
    rel = math.sqrt(diff_sq / ref_norm) if ref_norm > 0 else (0.0 if diff_sq == 0 else math.inf)
    return (float(d.max()) if d.numel() else 0.0), rel


def torch_state_dict(tensors: dict[str, TensorRef]) -> dict[str, Any]:
    """``key -> torch.Tensor`` for a description, tied tensors staying tied (one tensor per storage view)."""
    out: dict[str, Any] = {}
    seen: dict[tuple[str, int, tuple[int, ...], tuple[int, ...]], Any] = {}
    with FileCache() as files:
        for key, ref in tensors.items():
            ident = (ref.storage, ref.storage_offset, ref.shape, ref.stride)
            if ident not in seen:
                seen[ident] = composite_to_torch(ref, files)
            out[key] = seen[ident]
    return out
