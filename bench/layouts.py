"""Generators for large checkpoint layouts as sparse files: real headers, holes for the tensor bytes.

A Llama-2-70B-shaped set (``llama_sharded(out, **LLAMA2_70B)``) declares 138 GB in 29 shards and costs
a few kilobytes of disk: each shard is a valid safetensors file whose data section reads as zeros.
The tests use the same generator scaled down (``layers=2, hidden=32``). Run as a script to make one:
``python bench/layouts.py OUT_DIR`` (the 70B shape) or ``python bench/layouts.py OUT_DIR --tiny``.
"""

from __future__ import annotations

import json
import os
import struct
import sys
from typing import Any

# Llama-2-70B as its config.json gives it (the architecture's shape, not its weights)
LLAMA2_70B: dict[str, int] = {"layers": 80, "hidden": 8192, "intermediate": 28672, "heads": 64, "kv_heads": 8,
                              "vocab": 32000, "shards": 29}
_CODES = {"float16": "F16", "bfloat16": "BF16", "float32": "F32"}
_SIZES = {"float16": 2, "bfloat16": 2, "float32": 4}


def llama_tensors(layers: int, hidden: int, intermediate: int, heads: int, kv_heads: int,
                  vocab: int) -> list[tuple[str, tuple[int, ...]]]:
    """The keys and shapes of ``LlamaForCausalLM.state_dict()`` (untied embeddings), in its order."""
    kv = hidden // heads * kv_heads
    out: list[tuple[str, tuple[int, ...]]] = [("model.embed_tokens.weight", (vocab, hidden))]
    for i in range(layers):
        p = f"model.layers.{i}."
        out += [(p + "self_attn.q_proj.weight", (hidden, hidden)), (p + "self_attn.k_proj.weight", (kv, hidden)),
                (p + "self_attn.v_proj.weight", (kv, hidden)), (p + "self_attn.o_proj.weight", (hidden, hidden)),
                (p + "mlp.gate_proj.weight", (intermediate, hidden)), (p + "mlp.up_proj.weight", (intermediate, hidden)),
                (p + "mlp.down_proj.weight", (hidden, intermediate)), (p + "input_layernorm.weight", (hidden,)),
                (p + "post_attention_layernorm.weight", (hidden,))]
    return out + [("model.norm.weight", (hidden,)), ("lm_head.weight", (vocab, hidden))]


def llama_config(layers: int, hidden: int, intermediate: int, heads: int, kv_heads: int, vocab: int,
                 dtype: str = "float16") -> dict[str, Any]:
    """A ``config.json`` for the same shape (what ``--arch hf:DIR`` reads)."""
    return {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": hidden,
            "intermediate_size": intermediate, "num_hidden_layers": layers, "num_attention_heads": heads,
            "num_key_value_heads": kv_heads, "vocab_size": vocab, "max_position_embeddings": 4096,
            "rms_norm_eps": 1e-5, "tie_word_embeddings": False, "hidden_act": "silu", "dtype": dtype,
            "bos_token_id": 1, "eos_token_id": 2}


def write_sparse_safetensors(path: str, tensors: list[tuple[str, tuple[int, ...]]], dtype: str,
                             metadata: dict[str, str] | None = None) -> int:
    """A safetensors file with this header whose data is a hole (zeros); returns its data bytes."""
    header: dict[str, Any] = {"__metadata__": metadata} if metadata else {}
    pos = 0
    for key, shape in tensors:
        n = _SIZES[dtype]
        for d in shape:
            n *= d
        header[key] = {"dtype": _CODES[dtype], "shape": list(shape), "data_offsets": [pos, pos + n]}
        pos += n
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(text)) + text)
        f.truncate(8 + len(text) + pos)
    return pos


def llama_sharded(directory: str, *, layers: int, hidden: int, intermediate: int, heads: int, kv_heads: int,
                  vocab: int, shards: int, dtype: str = "float16") -> str:
    """Write a Llama-layout sharded set (``model-0000i-of-0000n.safetensors`` + index) and its ``config.json``
    into ``directory``; returns the index's path. Tensors are spread over the shards by bytes, in order."""
    os.makedirs(directory, exist_ok=True)
    tensors = llama_tensors(layers, hidden, intermediate, heads, kv_heads, vocab)
    sizes = [_SIZES[dtype] * _numel(shape) for _, shape in tensors]
    per_shard = -(-sum(sizes) // shards)
    groups: list[list[tuple[str, tuple[int, ...]]]] = [[]]
    filled = 0
    for (key, shape), size in zip(tensors, sizes):
        if groups[-1] and filled + size > per_shard and len(groups) < shards:
            groups.append([])
            filled = 0
        groups[-1].append((key, shape))
        filled += size
    weight_map: dict[str, str] = {}
    total = 0
    for i, group in enumerate(groups, 1):
        name = f"model-{i:05d}-of-{len(groups):05d}.safetensors"
        total += write_sparse_safetensors(os.path.join(directory, name), group, dtype, {"format": "pt"})
        weight_map.update({key: name for key, _ in group})
    index = os.path.join(directory, "model.safetensors.index.json")
    with open(index, "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
    with open(os.path.join(directory, "config.json"), "w") as f:
        json.dump(llama_config(layers, hidden, intermediate, heads, kv_heads, vocab, dtype), f, indent=2)
    return index


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


TINY: dict[str, int] = {"layers": 2, "hidden": 32, "intermediate": 64, "heads": 4, "kv_heads": 2, "vocab": 100,
                        "shards": 3}

if __name__ == "__main__":
    if len(sys.argv) < 2:
        raise SystemExit("usage: python bench/layouts.py OUT_DIR [--tiny]")
    print(llama_sharded(sys.argv[1], **(TINY if "--tiny" in sys.argv else LLAMA2_70B)))
