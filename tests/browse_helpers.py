"""Checkpoints the browser tests open: written by torch.save under a temp dir, small and deterministic."""

from __future__ import annotations

import os
from collections import OrderedDict


def build_net():
    """Twelve numbered blocks (``blocks.2`` sorts before ``blocks.10`` by name), a tied head, a strided view."""
    import torch
    from torch import nn

    class Block(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(8, 8)
            self.norm = nn.LayerNorm(8)

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed = nn.Embedding(20, 8)
            self.blocks = nn.Sequential(*[Block() for _ in range(12)])
            self.head = nn.Linear(8, 20, bias=False)
            self.head.weight = self.embed.weight
            self.register_buffer("proj", torch.arange(24, dtype=torch.float32).reshape(4, 6).t())

    torch.manual_seed(0)
    return Net()


def write_checkpoints(out: str) -> dict[str, str]:
    """``source`` (a training checkpoint: model, ema, epoch), ``target`` (one key of each diff status) and
    ``safetensors`` (the model's state dict on its own)."""
    import torch
    from safetensors.torch import save_file

    os.makedirs(out, exist_ok=True)
    sd = build_net().state_dict()
    paths = {
        name: os.path.join(out, file)
        for name, file in (("source", "train.pth"), ("target", "target.pth"), ("safetensors", "model.safetensors"))
    }
    ema = OrderedDict((k, v.clone()) for k, v in sd.items() if k.startswith("blocks.0."))
    torch.save({"model": sd, "ema": ema, "epoch": 7, "run": "baseline"}, paths["source"])
    target = OrderedDict((k, v.clone()) for k, v in sd.items() if k != "blocks.0.norm.bias")  # unexpected
    target["embed.weight"] = torch.zeros(30, 8)  # shape
    target["blocks.1.fc.bias"] = target["blocks.1.fc.bias"].half()  # dtype
    target["blocks.12.fc.weight"] = torch.zeros(8, 8)  # missing
    torch.save(target, paths["target"])
    save_file(
        {k: v.contiguous() for k, v in sd.items() if k != "head.weight"},
        paths["safetensors"],
        metadata={"format": "pt"},
    )
    return paths
