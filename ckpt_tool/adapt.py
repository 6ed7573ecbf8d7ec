"""Operations that change tensor values to fit another input: an input conv with another channel count,
a position embedding for another image size; and the one owner of *computed* values.

An entry whose ``transform`` is set is not written from its source bytes as they are: its values are
computed from them (:func:`computed_tensor`) when the output is written, and the same function gives
the values verification expects. Transforms:

- ``("adapt_input_conv",)``: the rule of timm's ``adapt_input_conv``, computed in float32 and cast
  back to the tensor's dtype: to 1 channel, the sum over the 3 RGB filters (a space-to-depth stem
  with ``3k`` channels sums each group of 3); to ``N`` channels from 3, the RGB filters repeated
  ``ceil(N / 3)`` times, cut to ``N`` and scaled by ``3 / N``.
- ``("resample_pos_embed", old_grid, new_grid, prefix_tokens)``: timm's ``resample_abs_pos_embed``:
  the ``prefix_tokens`` leading tokens (class, register tokens) kept as they are, the grid tokens
  resized from ``old_grid`` to ``new_grid`` by bicubic interpolation with antialiasing, in float32,
  cast back.
- ``("copy",)``: the source tensor's bytes, written as a tensor of its own (``--grow-blocks nearest``).
- ``("zero",)``: zeros (``--grow-blocks identity``).

Only the computed transforms import torch; a copy streams bytes.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterator
from dataclasses import replace
from typing import Any

from .checkpoint import TensorRef
from .errors import UsageError
from .plan import Entry, State, Target, _tensors

ADAPT_INPUT_CONV = "adapt_input_conv"
RESAMPLE_POS_EMBED = "resample_pos_embed"
COPY = "copy"
ZERO = "zero"
# transforms that need torch to compute
COMPUTED = (ADAPT_INPUT_CONV, RESAMPLE_POS_EMBED)
MAX_PREFIX_TOKENS = 16


# --- the state functions --------------------------------------------------------------------------


def adapt_input_conv(state: State, target: Target | None, module: str, in_chans: int | None = None) -> State:
    """Adapt ``MODULE.weight`` (``[out, in, kh, kw]``) to ``in_chans`` input channels (the target's when not given).

    A state without the key is returned as it is (the plan refuses an operation that matches nothing).
    """
    key = f"{module}.weight"
    e = state.get(key)
    if e is None:
        return state
    what = f"--adapt-input-conv {module}"
    if in_chans is None:
        want = _target_shape(target, key, what)
        if len(want) != len(e.shape):
            raise UsageError(f"{what}: the target's {key} is {list(want)}, the checkpoint's {list(e.shape)}")
        in_chans = want[1]
    if len(e.shape) < 3:
        raise UsageError(f"{what}: {key} {list(e.shape)} is not a convolution weight")
    have = e.shape[1]
    if in_chans == have:
        return state
    if in_chans < 1:
        raise UsageError(f"{what}: {in_chans} input channels")
    if not (have == 3 or (in_chans == 1 and have % 3 == 0)):
        raise UsageError(
            f"{what}: {key} has {have} input channels; only 3 (RGB) filters are adapted "
            "(or 3k of a space-to-depth stem to 1)"
        )
    _refuse_twice(e, what)
    shape = (e.shape[0], in_chans, *e.shape[2:])
    return {
        **state,
        key: replace(
            e, shape=shape, transform=(ADAPT_INPUT_CONV,), reason=f"adapt_input_conv {have} -> {in_chans} channels"
        ),
    }


def resample_pos_embed(
    state: State, target: Target | None, key: str, grid: tuple[int, int] | None = None, prefix_tokens: int | None = None
) -> State:
    """Resample the position embedding ``key`` (``[1, prefix + h * w, dim]``) to the target's grid (or ``grid``)."""
    e = state.get(key)
    if e is None:
        return state
    what = f"--resample-pos-embed {key}"
    if len(e.shape) != 3 or e.shape[0] != 1:
        raise UsageError(f"{what}: {list(e.shape)} is not a [1, tokens, dim] position embedding")
    have, dim = e.shape[1], e.shape[2]
    if grid is None:
        want = _target_shape(target, key, what)
        if len(want) != 3 or want[0] != 1 or want[2] != dim:
            raise UsageError(f"{what}: the target's {key} is {list(want)}, the checkpoint's {list(e.shape)}")
        if prefix_tokens is None:
            prefix_tokens = infer_prefix_tokens(have, want[1])
            if prefix_tokens is None:
                raise UsageError(
                    f"{what}: {have} and {want[1]} tokens are not square grids after the same number "
                    "of prefix tokens; give the grid: --resample-pos-embed KEY=P+HxW"
                )
        side = math.isqrt(want[1] - prefix_tokens)
        grid = (side, side)
    if prefix_tokens is None:
        prefix_tokens = next((p for p in range(MAX_PREFIX_TOKENS + 1) if _square(have - p)), None)
        if prefix_tokens is None:
            raise UsageError(f"{what}: {have} tokens are no square grid after up to {MAX_PREFIX_TOKENS} prefix tokens")
    old = math.isqrt(have - prefix_tokens) if have > prefix_tokens else 0
    if old * old != have - prefix_tokens or old == 0:
        raise UsageError(f"{what}: {have} tokens less {prefix_tokens} prefix tokens is no square grid")
    if grid == (old, old):
        return state
    _refuse_twice(e, what)
    shape = (1, prefix_tokens + grid[0] * grid[1], dim)
    return {
        **state,
        key: replace(
            e,
            shape=shape,
            transform=(RESAMPLE_POS_EMBED, (old, old), tuple(grid), prefix_tokens),
            reason=f"resample_pos_embed {old}x{old} -> {grid[0]}x{grid[1]} grid, "
            f"{prefix_tokens} prefix token{'s' * (prefix_tokens != 1)}",
        ),
    }


def infer_prefix_tokens(have: int, want: int) -> int | None:
    """The fewest prefix tokens after which both token counts are square grids (``5, 10`` -> 1), or None."""
    return next((p for p in range(MAX_PREFIX_TOKENS + 1) if _square(have - p) and _square(want - p)), None)


def _square(n: int) -> bool:
    return n > 0 and math.isqrt(n) ** 2 == n


def _target_shape(target: Target | None, key: str, what: str) -> tuple[int, ...]:
    if target is None:
        size = "N" if what.startswith("--adapt-input-conv") else "HxW"
        raise UsageError(f"{what}: give the target (--arch) or the size ({what}={size})")
    t = _tensors(target).get(key)
    if t is None:
        raise UsageError(f"{what}: the target has no {key}")
    return t.shape


def _refuse_twice(e: Entry, what: str) -> None:
    if e.transform:
        raise UsageError(f"{what}: {e.key} is already computed ({e.reason}); one value change per tensor")


# --- the command-line value: MODULE[=N], KEY[=HxW | P+HxW] ----------------------------------------


def parse_adapt_value(value: str) -> dict[str, Any]:
    """``conv1`` -> ``{"module": "conv1"}``; ``conv1=4`` -> ``{"module": "conv1", "in_chans": 4}``."""
    module, sep, n = value.partition("=")
    if not sep:
        return {"module": value}
    if not n.isdigit() or int(n) < 1:
        raise UsageError(f"--adapt-input-conv {value!r}: give MODULE or MODULE=N (N input channels)")
    return {"module": module, "in_chans": int(n)}


_GRID = re.compile(r"^(?:(\d+)\+)?(\d+)x(\d+)$")


def parse_resample_value(value: str) -> dict[str, Any]:
    """``pos_embed`` -> ``{"key": "pos_embed"}``; ``pos_embed=1+3x3`` adds ``grid`` [3, 3] and ``prefix_tokens`` 1."""
    key, sep, spec = value.partition("=")
    if not sep:
        return {"key": value}
    m = _GRID.match(spec)
    if m is None or int(m.group(2)) < 1 or int(m.group(3)) < 1:
        raise UsageError(f"--resample-pos-embed {value!r}: give KEY, KEY=HxW or KEY=P+HxW (P prefix tokens)")
    params: dict[str, Any] = {"key": key, "grid": [int(m.group(2)), int(m.group(3))]}
    if m.group(1) is not None:
        params["prefix_tokens"] = int(m.group(1))
    return params


def adapt_argv_value(params: dict[str, Any]) -> str:
    n = params.get("in_chans")
    return params["module"] if n is None else f"{params['module']}={n}"


def resample_argv_value(params: dict[str, Any]) -> str:
    grid, prefix = params.get("grid"), params.get("prefix_tokens")
    if grid is None:
        return str(params["key"])
    return f"{params['key']}={'' if prefix is None else f'{prefix}+'}{grid[0]}x{grid[1]}"


def apply_adapt(state: State, target: Target | None, params: dict[str, Any]) -> State:
    return adapt_input_conv(state, target, params["module"], params.get("in_chans"))


def check_resample(params: dict[str, Any]) -> None:
    grid = params.get("grid")
    if grid is not None and not (
        isinstance(grid, list) and len(grid) == 2 and all(isinstance(n, int) and n > 0 for n in grid)
    ):
        raise UsageError(f"operation 'resample_pos_embed' needs 'grid' as [h, w], got {grid!r}")
    if grid is None and params.get("prefix_tokens") is not None:
        raise UsageError("operation 'resample_pos_embed': 'prefix_tokens' needs a 'grid'")


def apply_resample(state: State, target: Target | None, params: dict[str, Any]) -> State:
    grid = params.get("grid")
    return resample_pos_embed(
        state, target, params["key"], tuple(grid) if grid is not None else None, params.get("prefix_tokens")
    )


# --- values ---------------------------------------------------------------------------------------


def needs_torch(e: Entry) -> bool:
    return bool(e.transform) and e.transform[0] in COMPUTED


def computed_tensor(e: Entry, read: Callable[[TensorRef], Any]) -> Any:
    """The values of a transformed entry, as a torch tensor of ``e.source_dtype`` and ``e.shape``."""
    import torch

    kind = e.transform[0]
    dtype = getattr(torch, e.source_dtype)
    if kind == ZERO:
        return torch.zeros(e.shape, dtype=dtype)
    assert e.ref is not None, f"{e.key}: a {kind} transform needs a source tensor"
    source = read(e.ref)
    if kind == COPY:
        return source
    if kind == ADAPT_INPUT_CONV:
        return _adapt_conv(source, e.shape[1]).to(dtype)
    if kind == RESAMPLE_POS_EMBED:
        _, old, new, prefix = e.transform
        return _resample(source, old, new, prefix).to(dtype)
    raise AssertionError(f"unknown transform {kind!r}")


def computed_chunks(e: Entry, files: Any, chunk_bytes: int = 4 * 1024 * 1024) -> Iterator[bytes]:
    """The bytes of a transformed entry in ``e.source_dtype`` (a copy streams; the rest are computed)."""
    from .values import iter_raw_chunks, to_torch

    if e.transform[0] == COPY and e.ref is not None:
        yield from iter_raw_chunks(e.ref, files, chunk_bytes)
        return
    import torch

    t = computed_tensor(e, lambda ref: to_torch(ref, files)).contiguous().reshape(-1)
    if t.numel():
        data = memoryview(t.view(torch.uint8).numpy())
        for i in range(0, len(data), chunk_bytes):
            yield bytes(data[i : i + chunk_bytes])


def _adapt_conv(weight: Any, in_chans: int) -> Any:
    w = weight.float()  # summed in float32, as timm does (half sums are not supported on every CPU)
    out, have = w.shape[0], w.shape[1]
    if in_chans == 1:
        if have > 3:  # a space-to-depth stem: each group of 3 channels is one RGB pixel
            return w.reshape(out, have // 3, 3, *w.shape[2:]).sum(dim=2)
        return w.sum(dim=1, keepdim=True)
    repeat = math.ceil(in_chans / 3)
    return w.repeat(1, repeat, *([1] * (w.dim() - 2)))[:, :in_chans] * (3 / float(in_chans))


def _resample(posemb: Any, old: tuple[int, int], new: tuple[int, int], prefix: int) -> Any:
    import torch
    import torch.nn.functional as F

    head, grid = posemb[:, :prefix], posemb[:, prefix:]
    dim = grid.shape[-1]
    grid = grid.float().reshape(1, old[0], old[1], dim).permute(0, 3, 1, 2)
    grid = F.interpolate(grid, size=list(new), mode="bicubic", antialias=True)
    grid = grid.permute(0, 2, 3, 1).reshape(1, -1, dim).to(posemb.dtype)
    return torch.cat([head, grid], dim=1) if prefix else grid
