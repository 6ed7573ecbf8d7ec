"""What finetune-check writes: the fine-tuned weights and the plot."""

from __future__ import annotations

import functools
import os
from typing import Any

from ..checkpoint import contiguous_strides
from ..errors import OutputError
from .report import Epoch, Phase


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


def _plot(losses: list[float], phases: list[Phase], epochs: list[Epoch], out: str) -> str:
    """Three panels: training loss per step; held-out loss and accuracy per epoch; the learning rate per epoch.

    The phase boundary (the unfreezing) is a dashed line on each.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_loss, ax_held, ax_lr) = plt.subplots(3, 1, figsize=(8, 9), constrained_layout=True)
    ax_loss.plot(range(1, len(losses) + 1), losses, label="training loss", color="tab:blue")
    ax_loss.set_xlabel("step")
    ax_loss.set_ylabel("loss")
    ax_loss.set_title("training loss per step")
    edge, boundary = 0, 0
    for phase in phases[:-1]:
        edge += phase.steps
        boundary += phase.epochs
        ax_loss.axvline(edge + 0.5, color="grey", linestyle="--", label=f"end of {phase.name}")
    ax_loss.legend()
    rows = [e for e in epochs if e.heldout_loss is not None]
    xs = [e.epoch for e in rows]
    ax_held.plot(xs, [e.heldout_loss for e in rows], marker="o", color="tab:red", label="held-out loss")
    ax_held.set_xlabel("epoch (0: before training)")
    ax_held.set_ylabel("held-out loss")
    ax_held.set_title("held-out loss and accuracy after each epoch")
    ax_acc = ax_held.twinx()
    ax_acc.plot(
        xs, [100 * (e.heldout_accuracy or 0.0) for e in rows], marker="s", color="tab:green", label="held-out accuracy"
    )
    ax_acc.set_ylabel("accuracy (%)")
    ax_acc.set_ylim(0, 100)
    trained = [e for e in epochs if e.epoch]
    ax_lr.step([e.epoch for e in trained], [e.lr for e in trained], where="mid", marker="o", color="tab:purple")
    ax_lr.set_xlabel("epoch")
    ax_lr.set_ylabel("learning rate")
    ax_lr.set_title("learning rate used in each epoch")
    if trained and min(e.lr for e in trained) > 0:
        ax_lr.set_yscale("log")
    for ax in (ax_held, ax_lr):
        if boundary:
            ax.axvline(boundary + 0.5, color="grey", linestyle="--", label=f"end of {phases[0].name}")
        ax.xaxis.get_major_locator().set_params(integer=True)
    lines = [line for line in ax_held.get_lines() + ax_acc.get_lines() if not str(line.get_label()).startswith("_")]
    ax_held.legend(lines, [str(line.get_label()) for line in lines], loc="center right")
    try:
        fig.savefig(out, dpi=100)
    except OSError as exc:
        raise OutputError(f"{out}: cannot be written ({exc.strerror or exc})") from None
    finally:
        plt.close(fig)
    return out
