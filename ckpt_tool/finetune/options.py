"""What ``finetune-check`` can be told, and the checks on it that need no model."""

from __future__ import annotations

import importlib.util
import math
import os
from dataclasses import dataclass, field
from typing import Any

from ..errors import OutputError, UsageError

SCHEDULERS = ("plateau", "cosine", "step", "none")
EVAL_BN = ("reestimate", "running")  # BatchNorm statistics for held-out evaluation (train.BnSource)
OVERFIT_STEPS = 20  # see checks.overfit_verdict for why 20
DEFAULT_LR = 1e-3


@dataclass(frozen=True)
class FinetuneOptions:
    """Everything ``finetune-check`` can be told; the defaults are the command's."""

    key: str | None = None
    arch_args: dict[str, Any] = field(default_factory=dict)
    strip_prefix: tuple[str, ...] = ()
    add_prefix: tuple[str, ...] = ()
    rename: tuple[str, ...] = ()
    drop: tuple[str, ...] = ()
    plan: str | None = None
    # migrate operations (plan.Operation) in command-line order, applied after the fields above
    operations: tuple[Any, ...] = ()
    strict: bool = False
    num_classes: int | None = None
    head: str | None = None
    freeze: tuple[str, ...] = ()
    trainable: tuple[str, ...] = ()
    freeze_first: int | None = None
    freeze_epochs: int = 0
    unfreeze_lr: float | None = None
    freeze_bn: bool = False
    train_frozen: bool = False  # also train what the model itself built with requires_grad=False
    data: str = "synthetic"
    image_size: int | None = None
    epochs: int = 1
    max_steps: int | None = None
    batch_size: int = 16
    lr: float | None = None  # None: DEFAULT_LR, which the overfit check may lower (train.overfit_lrs)
    optimizer: str = "adam"
    scheduler: str = "none"  # plateau, cosine, step or none; a fresh one for each phase, stepped per epoch
    plateau_patience: int = 0
    plateau_factor: float = 0.1
    step_size: int = 1
    step_gamma: float = 0.1
    device: str = "auto"
    amp: bool = False
    seed: int = 0
    overfit_steps: int = OVERFIT_STEPS
    eval_batches: int = 2
    eval_bn: str = "reestimate"  # reestimate or running: BatchNorm statistics for evaluation (train.BnSource)
    plot: str | None = None
    save: str | None = None
    force: bool = False
    resume_optimizer: bool = False  # start from the checkpoint's optimizer state (finetune.resume)


def learning_rate(opts: FinetuneOptions) -> float:
    """The rate training starts at: ``--lr``, or the default."""
    return DEFAULT_LR if opts.lr is None else opts.lr


def _validate(opts: FinetuneOptions) -> None:
    positive = {
        "--epochs": opts.epochs,
        "--batch-size": opts.batch_size,
        "--overfit-steps": opts.overfit_steps,
        "--eval-batches": opts.eval_batches,
    }
    for name, value in positive.items():
        if value < 1:
            raise UsageError(f"{name} must be at least 1, got {value}")
    for name, opt in (
        ("--max-steps", opts.max_steps),
        ("--num-classes", opts.num_classes),
        ("--freeze-first", opts.freeze_first),
        ("--image-size", opts.image_size),
    ):
        if opt is not None and opt < 1:
            raise UsageError(f"{name} must be at least 1, got {opt}")
    if opts.lr is not None and not (opts.lr > 0 and math.isfinite(opts.lr)):
        raise UsageError(f"--lr must be a positive number, got {opts.lr}")
    if opts.scheduler not in SCHEDULERS:
        raise UsageError(f"--scheduler must be one of {', '.join(SCHEDULERS)}, got {opts.scheduler!r}")
    if opts.plateau_patience < 0 or opts.step_size < 1:
        raise UsageError("--plateau-patience must be 0 or more and --step-size at least 1")
    for flag, ratio in (("--plateau-factor", opts.plateau_factor), ("--step-gamma", opts.step_gamma)):
        if not 0 < ratio < 1:
            raise UsageError(f"{flag} must be between 0 and 1, got {ratio}")
    if opts.eval_bn not in EVAL_BN:
        raise UsageError(f"--eval-bn must be one of {', '.join(EVAL_BN)}, got {opts.eval_bn!r}")
    if opts.optimizer not in ("adam", "sgd"):
        raise UsageError(f"--optimizer must be adam or sgd, got {opts.optimizer!r}")
    if opts.freeze_epochs < 0:
        raise UsageError(f"--freeze-epochs must be 0 or more, got {opts.freeze_epochs}")
    if opts.freeze_epochs and opts.freeze_epochs >= opts.epochs:
        raise UsageError(
            f"--freeze-epochs {opts.freeze_epochs} leaves no epoch to train unfrozen "
            f"(--epochs {opts.epochs} counts both phases)",
            hint=f"pass --epochs {opts.freeze_epochs + 1}",
        )
    if opts.unfreeze_lr is not None and not opts.freeze_epochs:
        raise UsageError("--unfreeze-lr only applies with --freeze-epochs")
    if opts.plot and importlib.util.find_spec("matplotlib") is None:
        raise UsageError("--plot needs matplotlib, which is not installed", hint="pip install 'ckpt-tool[plot]'")
    if opts.save and not opts.save.endswith(".safetensors"):
        raise UsageError(f"--save {opts.save}: the output must be a .safetensors file")
    if opts.save and os.path.exists(opts.save) and not opts.force:
        raise OutputError(f"{opts.save}: exists", hint="pass --force to overwrite it")


def _pick_device(name: str, amp: bool) -> Any:
    import torch

    if name not in ("auto", "cpu", "cuda") and not name.startswith("cuda:"):
        raise UsageError(f"--device must be auto, cpu or cuda, got {name!r}")
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UsageError("--device cuda: no CUDA device is available")
    if amp and not name.startswith("cuda"):
        raise UsageError("--amp needs a CUDA device (mixed precision is not used on the CPU)")
    return torch.device(name)
