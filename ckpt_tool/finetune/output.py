"""What finetune-check writes: the fine-tuned weights and the plot."""

from __future__ import annotations

import functools
import os
from typing import Any

from ..errors import OutputError
from ..model import contiguous_strides
from .report import Phase


def _save(model: Any, out: str, force: bool, source: str) -> str:
    """The fine-tuned state dict as safetensors, through migrate's atomic writer."""
    from ..writer import Blob, Layout, View, write_checkpoint

    if os.path.exists(out) and os.path.exists(source) and os.path.samefile(source, out):
        raise OutputError(f"--save {out}: is the input checkpoint; write the fine-tuned weights elsewhere")
    blobs, views = [], []
    # one blob per key: safetensors cannot share storage between tensors (tied weights are written twice)
    for key, value in model.state_dict().items():
        tensor = value.detach()
        dtype = str(tensor.dtype).removeprefix("torch.")
        blobs.append(Blob(dtype, tensor.numel() * tensor.element_size(), functools.partial(_tensor_chunks, tensor)))
        views.append(View(key, len(blobs) - 1, dtype, tuple(tensor.shape), contiguous_strides(tuple(tensor.shape))))
    write_checkpoint(out, Layout(tuple(blobs), tuple(views)), metadata={"written_by": "ckpt finetune-check"})
    return out


def _tensor_chunks(tensor: Any) -> list[bytes]:
    import torch

    flat = tensor.to("cpu").contiguous().reshape(-1)
    return [flat.view(torch.uint8).numpy().tobytes()] if flat.numel() else []


def _plot(losses: list[float], phases: list[Phase], out: str) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(range(1, len(losses) + 1), losses, label="training loss")
    edge = 0
    for phase in phases[:-1]:
        edge += phase.steps
        ax.axvline(edge + 0.5, color="grey", linestyle="--", label=f"end of {phase.name}")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.legend()
    try:
        fig.savefig(out, dpi=100)
    except OSError as exc:
        raise OutputError(f"{out}: cannot be written ({exc.strerror or exc})") from None
    finally:
        plt.close(fig)
    return out

