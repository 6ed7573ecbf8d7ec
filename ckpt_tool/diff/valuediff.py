"""``diff --values``: max |a - b| and the relative change of two checkpoints' tensors, streamed chunk by chunk."""

from __future__ import annotations

import math
from dataclasses import replace
from typing import Any

from ..checkpoint import Progress, TensorRef, itemsize
from .report import DTYPE, MATCHED, KeyDiff

# elements compared per step with --values: bounded memory whatever the tensor size
VALUE_CHUNK_ELEMENTS = 1 << 20


def with_values(
    keys: list[KeyDiff], src: dict[str, TensorRef], tgt: dict[str, TensorRef], progress: Progress | None = None
) -> list[KeyDiff]:
    from ..values import FileCache

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

    from ..values import compare_composite, iter_raw_chunks, to_numpy

    if a.kind != "dense" or b.kind != "dense":
        return compare_composite(a, b, files)  # quantized by their dequantized values, sparse by dense ones
    n = a.numel
    if n == 0:
        return 0.0, 0.0
    # strided views stream in blocks of whole rows, which need not line up with the other side's
    # chunks, so then both sides are read as one chunk
    elements = min(n, VALUE_CHUNK_ELEMENTS) if a.is_contiguous and b.is_contiguous else n
    max_abs, diff_sq, ref_sq = 0.0, 0.0, 0.0
    chunks = zip(
        iter_raw_chunks(a, files, elements * itemsize(a.dtype)),
        iter_raw_chunks(b, files, elements * itemsize(b.dtype)),
        strict=True,
    )
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
