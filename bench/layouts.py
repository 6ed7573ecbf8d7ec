"""Generators for the big checkpoint layouts the scale benchmarks (and, scaled down, the tests) read.

safetensors files are written header-only: the header is real, the data section is a hole
(``truncate``), so a 700 GB DeepSeek-V3-style set costs a few megabytes of disk and reads as
zeros. ``.pth`` files are real ``torch.save`` outputs of tiny tensors (torch's own zip layout,
one storage per tensor), so their cost is the number of tensors, as it is for ckpt.

Every generator takes the size as an argument; the benchmarks use the full sizes below, the tests
a few thousand tensors.
"""

from __future__ import annotations

import json
import math
import os
import struct
from collections.abc import Iterable, Iterator

# bytes per element of the safetensors dtype codes used here
_ITEMSIZE = {"F32": 4, "F16": 2, "BF16": 2, "F8_E4M3": 1}
_TORCH_DTYPE = {"F32": "float32", "F16": "float16", "BF16": "bfloat16", "F8_E4M3": "float8_e4m3fn"}
_CODE_OF = {name: code for code, name in _TORCH_DTYPE.items()}  # torch dtype name -> safetensors code

Spec = tuple[str, str, tuple[int, ...]]  # (key, safetensors dtype code, shape)

FLAT_MODULES = ("attn.q", "attn.k", "attn.v", "attn.o", "mlp.up", "mlp.down", "norm1", "norm2", "ada.lin", "ada.mod")


def flat_specs(tensors: int = 100_000) -> list[Spec]:
    """``tensors`` tiny tensors: layers x 10 modules x (a 4x2 float32 weight, a 4-element float16 bias)."""
    out: list[Spec] = []
    for i in range(math.ceil(tensors / (2 * len(FLAT_MODULES)))):
        for m in FLAT_MODULES:
            out.append((f"model.layers.{i}.{m}.weight", "F32", (4, 2)))
            out.append((f"model.layers.{i}.{m}.bias", "F16", (4,)))
    return out[:tensors]


def llama_specs(
    layers: int = 80, hidden: int = 8192, intermediate: int = 28672, kv: int = 1024, vocab: int = 32000
) -> list[Spec]:
    """A Llama-2-70B-shaped state dict in bfloat16 (80 layers, grouped-query attention): 723 tensors, 138 GB."""
    out: list[Spec] = [("model.embed_tokens.weight", "BF16", (vocab, hidden))]
    for i in range(layers):
        p = f"model.layers.{i}."
        out += [
            (p + "self_attn.q_proj.weight", "BF16", (hidden, hidden)),
            (p + "self_attn.k_proj.weight", "BF16", (kv, hidden)),
            (p + "self_attn.v_proj.weight", "BF16", (kv, hidden)),
            (p + "self_attn.o_proj.weight", "BF16", (hidden, hidden)),
            (p + "mlp.gate_proj.weight", "BF16", (intermediate, hidden)),
            (p + "mlp.up_proj.weight", "BF16", (intermediate, hidden)),
            (p + "mlp.down_proj.weight", "BF16", (hidden, intermediate)),
            (p + "input_layernorm.weight", "BF16", (hidden,)),
            (p + "post_attention_layernorm.weight", "BF16", (hidden,)),
        ]
    out += [("model.norm.weight", "BF16", (hidden,)), ("lm_head.weight", "BF16", (vocab, hidden))]
    return out


def deepseek_specs(
    layers: int = 61,
    dense_layers: int = 3,
    experts: int = 256,
    hidden: int = 7168,
    intermediate: int = 18432,
    moe_intermediate: int = 2048,
    vocab: int = 129280,
) -> list[Spec]:
    """A DeepSeek-V3-style MoE state dict: fp8 (``F8_E4M3``) projections, each with its 128x128-block
    ``weight_scale_inv`` (float32) beside it; about 91,000 tensors and 680 GB at the full size."""

    def fp8(name: str, rows: int, cols: int) -> list[Spec]:
        return [
            (name + ".weight", "F8_E4M3", (rows, cols)),
            (name + ".weight_scale_inv", "F32", (math.ceil(rows / 128), math.ceil(cols / 128))),
        ]

    out: list[Spec] = [("model.embed_tokens.weight", "BF16", (vocab, hidden))]
    for i in range(layers):
        p = f"model.layers.{i}."
        out += [
            (p + "input_layernorm.weight", "BF16", (hidden,)),
            (p + "post_attention_layernorm.weight", "BF16", (hidden,)),
            (p + "self_attn.q_a_layernorm.weight", "BF16", (1536,)),
            (p + "self_attn.kv_a_layernorm.weight", "BF16", (512,)),
        ]
        out += fp8(p + "self_attn.q_a_proj", 1536, hidden) + fp8(p + "self_attn.q_b_proj", 24576, 1536)
        out += fp8(p + "self_attn.kv_a_proj_with_mqa", 576, hidden) + fp8(p + "self_attn.kv_b_proj", 32768, 512)
        out += fp8(p + "self_attn.o_proj", hidden, 16384)
        if i < dense_layers:
            out += fp8(p + "mlp.gate_proj", intermediate, hidden) + fp8(p + "mlp.up_proj", intermediate, hidden)
            out += fp8(p + "mlp.down_proj", hidden, intermediate)
            continue
        out += [
            (p + "mlp.gate.weight", "BF16", (experts, hidden)),
            (p + "mlp.gate.e_score_correction_bias", "F32", (experts,)),
        ]
        for e in ["shared_experts", *(f"experts.{j}" for j in range(experts))]:
            out += fp8(f"{p}mlp.{e}.gate_proj", moe_intermediate, hidden)
            out += fp8(f"{p}mlp.{e}.up_proj", moe_intermediate, hidden)
            out += fp8(f"{p}mlp.{e}.down_proj", hidden, moe_intermediate)
    out += [("model.norm.weight", "BF16", (hidden,)), ("lm_head.weight", "BF16", (vocab, hidden))]
    return out


def nbytes(spec: Spec) -> int:
    return math.prod(spec[2]) * _ITEMSIZE[spec[1]]


def write_safetensors(path: str, specs: Iterable[Spec], metadata: dict[str, str] | None = None) -> int:
    """A safetensors file whose data section is a hole: real header, sparse zeros. Returns its size."""
    header: dict[str, object] = {"__metadata__": metadata} if metadata else {}
    offset = 0
    for key, code, shape in specs:
        size = math.prod(shape) * _ITEMSIZE[code]
        header[key] = {"dtype": code, "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path + ".tmp", "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw)
        f.truncate(8 + len(raw) + offset)
    os.replace(path + ".tmp", path)
    return 8 + len(raw) + offset


def write_pth(path: str, specs: Iterable[Spec]) -> None:
    """A real ``torch.save`` of the specs as tiny zero tensors (for the small layouts only)."""
    import torch

    state = {key: torch.zeros(shape, dtype=getattr(torch, _TORCH_DTYPE[code])) for key, code, shape in specs}
    torch.save(state, path + ".tmp")
    os.replace(path + ".tmp", path)


def _split(specs: list[Spec], shards: int) -> Iterator[list[Spec]]:
    per = math.ceil(len(specs) / shards)
    for i in range(shards):
        yield specs[i * per : (i + 1) * per]


def write_sharded(directory: str, specs: list[Spec], shards: int, fmt: str = "safetensors") -> str:
    """A Hugging Face sharded set (``model-0000i-of-0000n.safetensors`` or ``pytorch_model-...bin``
    plus the index) in ``directory``. Returns the index's path."""
    os.makedirs(directory, exist_ok=True)
    stem, ext, index_name = (
        ("model", "safetensors", "model.safetensors.index.json")
        if fmt == "safetensors"
        else ("pytorch_model", "bin", "pytorch_model.bin.index.json")
    )
    weight_map: dict[str, str] = {}
    total = 0
    for i, part in enumerate(_split(specs, shards), 1):
        name = f"{stem}-{i:05d}-of-{shards:05d}.{ext}"
        if fmt == "safetensors":
            write_safetensors(os.path.join(directory, name), part, {"format": "pt"})
        else:
            write_pth(os.path.join(directory, name), part)
        weight_map.update((key, name) for key, _, _ in part)
        total += sum(nbytes(s) for s in part)
    index = os.path.join(directory, index_name)
    with open(index + ".tmp", "w", encoding="utf-8") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
    os.replace(index + ".tmp", index)
    return index


# Llama-2-70B as its config.json gives it (the architecture's shape, not its weights), and a tiny one
LLAMA2_70B: dict[str, int] = {
    "layers": 80,
    "hidden": 8192,
    "intermediate": 28672,
    "heads": 64,
    "kv_heads": 8,
    "vocab": 32000,
    "shards": 29,
}
TINY: dict[str, int] = {
    "layers": 2,
    "hidden": 32,
    "intermediate": 64,
    "heads": 4,
    "kv_heads": 2,
    "vocab": 100,
    "shards": 3,
}


def llama_config(
    layers: int, hidden: int, intermediate: int, heads: int, kv_heads: int, vocab: int, dtype: str = "float16"
) -> dict[str, object]:
    """A ``config.json`` for the same shape (what ``--arch hf:DIR`` reads)."""
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": hidden,
        "intermediate_size": intermediate,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "vocab_size": vocab,
        "max_position_embeddings": 4096,
        "rms_norm_eps": 1e-5,
        "tie_word_embeddings": False,
        "hidden_act": "silu",
        "dtype": dtype,
        "bos_token_id": 1,
        "eos_token_id": 2,
    }


def llama_sharded(
    directory: str,
    *,
    layers: int,
    hidden: int,
    intermediate: int,
    heads: int,
    kv_heads: int,
    vocab: int,
    shards: int,
    dtype: str = "float16",
) -> str:
    """A Llama-layout sharded set (``model-0000i-of-0000n.safetensors`` + index) and its ``config.json``
    in ``directory``; returns the index's path."""
    specs = [
        (key, _CODE_OF[dtype], shape)
        for key, _, shape in llama_specs(layers, hidden, intermediate, hidden // heads * kv_heads, vocab)
    ]
    index = write_sharded(directory, specs, shards)
    with open(os.path.join(directory, "config.json"), "w", encoding="utf-8") as f:
        json.dump(llama_config(layers, hidden, intermediate, heads, kv_heads, vocab, dtype), f, indent=2)
    return index


if __name__ == "__main__":
    import sys

    if len(sys.argv) < 2:
        raise SystemExit("usage: python bench/layouts.py OUT_DIR [--tiny]  (a Llama-2-70B-shaped sparse set)")
    print(llama_sharded(sys.argv[1], **(TINY if "--tiny" in sys.argv else LLAMA2_70B)))
