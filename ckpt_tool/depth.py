"""Depth policies: a target with more or fewer repeated blocks than the checkpoint.

A *stage* is a module path followed by a numbered segment whose numbers run 0, 1, ..., n-1 in both
the checkpoint and the target: ``layer1.0``, ``layer1.1`` (torchvision and timm ResNets),
``encoder.layer.N`` (BERT), ``blocks.N`` (timm ViT), ``model.layers.N`` (Llama). The block is the
first numbered segment of a key (``layer1.0.downsample.0.weight`` is in block 0 of ``layer1``);
stages whose numbers have gaps (``features.0``, ``features.3`` of a VGG) are not repeated blocks.

``--grow-blocks`` (blocks the target has beyond the checkpoint's):

- ``nearest``: each new block is a copy of the nearest trained block of the same stage (by number,
  the lower on a tie) whose keys and shapes are the new block's; in practice the last one.
- ``identity``: each new block keeps the target's initialisation, except the tensors that make its
  residual branch output zero, which are written as zeros: the weight and bias of the block's last
  norm of a convolutional residual block (the highest-numbered ``bnN``: ``bn2`` of a BasicBlock,
  ``bn3`` of a Bottleneck), and the weight and bias of a transformer block's output projections
  (:data:`OUTPUT_PROJECTIONS`). In a ResNet (ReLU after the sum) and a pre-norm transformer (timm
  ViT, Llama, GPT-2) the new block then computes the identity; in a post-norm one (BERT) it computes
  its two LayerNorms of its input (``LN2(LN1(x))``: about the identity for an input that a LayerNorm
  of unit scale and zero shift produced, not in general).

``--shrink-blocks`` (fewer blocks in the target, ``m`` of the checkpoint's ``n``):

- ``first``: keep blocks 0 .. m-1.
- ``every-k``: keep blocks 0, k, 2k, ... (m of them), k = n // m, renumbered 0 .. m-1.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import replace
from typing import Any

from .adapt import COPY, ZERO
from .arch import TargetTensor
from .compat import shapes_load
from .errors import UsageError
from .plan import Entry, State, Target, _tensors

GROW_POLICIES = ("nearest", "identity")
SHRINK_POLICIES = ("first", "every-k")

# leaf module paths, inside a block, of a transformer block's output projections (zeroed by identity)
OUTPUT_PROJECTIONS = (
    "attn.proj",
    "mlp.fc2",  # timm ViT
    "attention.output.dense",
    "output.dense",  # BERT, RoBERTa
    "self_attn.o_proj",
    "mlp.down_proj",  # Llama, Mistral, Qwen
    "attn.c_proj",
    "mlp.c_proj",  # GPT-2
    "self_attn.out_proj",
    "linear2",  # torch.nn.TransformerEncoderLayer
)
_BLOCK = re.compile(r"^(?P<stage>.+?)\.(?P<index>\d+)\.(?P<rest>.+)$")
_NORM = re.compile(r"^bn(\d+)\.(weight|bias)$")

Blocks = dict[str, dict[int, dict[str, str]]]  # stage -> block number -> rest of the key -> key


def blocks(keys: Any) -> Blocks:
    """The repeated blocks of ``keys``: stage -> number -> rest -> key, stages numbered 0 .. n-1 only."""
    out: Blocks = {}
    for key in keys:
        m = _BLOCK.match(key)
        if m:
            out.setdefault(m["stage"], {}).setdefault(int(m["index"]), {})[m["rest"]] = key
    return {s: b for s, b in out.items() if sorted(b) == list(range(len(b)))}


def depth_changes(state_keys: Any, target_keys: Any) -> dict[str, tuple[int, int]]:
    """Stage -> (checkpoint's blocks, target's blocks) for the stages present on both sides with other counts."""
    have, want = blocks(state_keys), blocks(target_keys)
    return {s: (len(have[s]), len(want[s])) for s in have if s in want and len(have[s]) != len(want[s])}


def grow_blocks(state: State, target: Target, policy: str) -> State:
    """Add the blocks the target has beyond the checkpoint's, by ``policy`` (see the module docstring)."""
    if policy not in GROW_POLICIES:
        raise UsageError(f"--grow-blocks {policy}: choose one of {', '.join(GROW_POLICIES)}")
    tensors = _tensors(target)
    have, want = blocks(state), blocks(tensors)
    out = dict(state)
    for stage, (n, m) in depth_changes(state, tensors).items():
        for j in range(n, m):
            new = want[stage][j]
            if policy == "nearest":
                out.update(_copy_nearest(state, have[stage], stage, j, new, tensors))
            else:
                out.update(_identity(stage, j, new, tensors))
    return out


def shrink_blocks(state: State, target: Target, policy: str) -> State:
    """Keep as many blocks per stage as the target has, by ``policy``, renumbered from 0."""
    if policy not in SHRINK_POLICIES:
        raise UsageError(f"--shrink-blocks {policy}: choose one of {', '.join(SHRINK_POLICIES)}")
    tensors = _tensors(target)
    have = blocks(state)
    renames: dict[str, str | None] = {}
    for stage, (n, m) in depth_changes(state, tensors).items():
        if m > n:
            continue
        step = 1 if policy == "first" else n // m
        kept = {i * step: i for i in range(m)}
        for i, rests in have[stage].items():
            for rest, key in rests.items():
                renames[key] = f"{stage}.{kept[i]}.{rest}" if i in kept else None
    out: State = {}
    for key, e in state.items():
        name = renames.get(key, key)
        if name is not None:
            out[name] = replace(e, key=name) if name != key else e
    return out


def _copy_nearest(
    state: State,
    trained: dict[int, dict[str, str]],
    stage: str,
    j: int,
    new: dict[str, str],
    tensors: Mapping[str, TargetTensor],
) -> State:
    for i in sorted(trained, key=lambda i: (abs(i - j), i)):
        src = trained[i]
        if all(rest in src and shapes_load(state[src[rest]].shape, tensors[key].shape) for rest, key in new.items()):
            return {key: _copy(state[src[rest]], key) for rest, key in new.items()}
    raise UsageError(
        f"--grow-blocks nearest: no trained block of {stage} has the keys and shapes of {stage}.{j} "
        "(try --grow-blocks identity, or --fill-missing)"
    )


def _copy(e: Entry, key: str) -> Entry:
    if e.transform:
        raise UsageError(f"--grow-blocks nearest: {e.key} is computed ({e.reason}); grow the blocks first")
    return replace(e, key=key, transform=(COPY,), reason=f"grow_blocks nearest: copy of {e.origin}", tied_to="")


def _identity(stage: str, j: int, new: dict[str, str], tensors: Mapping[str, TargetTensor]) -> State:
    zero = set(identity_keys(new))
    if not zero:
        raise UsageError(
            f"--grow-blocks identity: {stage}.{j} has no last norm (bnN) or output projection "
            f"({', '.join(OUTPUT_PROJECTIONS)}) to zero; try --grow-blocks nearest"
        )
    out: State = {}
    for rest, key in new.items():
        e = Entry.from_target(key, tensors[key], "grow_blocks identity")
        out[key] = replace(e, transform=(ZERO,), reason="grow_blocks identity: zero") if rest in zero else e
    return out


def identity_keys(rests: Mapping[str, str] | Any) -> list[str]:
    """The rests of a block's keys that ``identity`` zeroes: its last ``bnN`` or its output projections."""
    norms = [(int(m[1]), r) for r in rests if (m := _NORM.match(r))]
    if norms:
        last = max(n for n, _ in norms)
        return [r for n, r in norms if n == last]
    return [
        r for r in rests if r.rpartition(".")[0] in OUTPUT_PROJECTIONS and r.rpartition(".")[2] in ("weight", "bias")
    ]


def apply_grow(state: State, target: Target | None, params: dict[str, Any]) -> State:
    if target is None:
        raise UsageError("--grow-blocks needs the target architecture (--arch)")
    return grow_blocks(state, target, params["policy"])


def apply_shrink(state: State, target: Target | None, params: dict[str, Any]) -> State:
    if target is None:
        raise UsageError("--shrink-blocks needs the target architecture (--arch)")
    return shrink_blocks(state, target, params["policy"])
