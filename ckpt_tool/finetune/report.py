"""The frozen results of ``finetune-check``: the load report, phases, epochs, checks and the whole report."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, fields
from typing import Any

from ..compat import Mismatch

PASS, FAIL, INFO, SKIP = "pass", "fail", "info", "skip"

Shape = tuple[int, ...]


@dataclass(frozen=True)
class LoadReport:
    """How the checkpoint's tensors met the model's state dict (after the migrate operations)."""

    loaded: int
    model_keys: int
    checkpoint_keys: int
    missing: tuple[str, ...]
    unexpected: tuple[str, ...]
    mismatched: tuple[Mismatch, ...]
    head_keys: tuple[str, ...]  # keys of the replaced head: expected to be missing or mismatched
    operations: tuple[str, ...]
    initialised: tuple[str, ...] = ()  # left to the model's own initialisation by the plan
    missing_shapes: dict[str, Shape] = field(default_factory=dict)  # the model's shape of each missing key
    unexpected_shapes: dict[str, Shape] = field(default_factory=dict)  # the checkpoint's, of each unexpected key
    auto_filled: tuple[str, ...] = ()  # absent keys torch fills in itself (num_batches_tracked)
    tied: tuple[tuple[str, str], ...] = ()  # (absent alias, loaded partner) of the model's tied weights

    @property
    def clean(self) -> bool:
        return not (self.missing or self.unexpected or self.mismatched)


@dataclass(frozen=True)
class HeadChange:
    module: str
    old: str
    new: str
    aux: tuple[str, ...] = ()  # auxiliary classifiers replaced alongside (GoogLeNet, Inception)


@dataclass(frozen=True)
class ModuleParams:
    """Parameter counts of one top-level module in the first phase; ``by_model`` of the frozen ones the model froze."""

    module: str
    trainable: int
    frozen: int
    by_model: int = 0


@dataclass(frozen=True)
class Epoch:
    """One epoch's row: the learning rate it used, its mean training loss, then held-out loss and accuracy."""

    phase: str
    epoch: int  # counted over the whole run, from 1
    lr: float
    steps: int
    train_loss: float | None
    heldout_loss: float | None
    heldout_accuracy: float | None
    images_per_s: float | None


@dataclass(frozen=True)
class Phase:
    name: str
    epochs: int
    lr: float
    trainable: int
    frozen: int
    steps: int
    epoch_losses: tuple[float, ...]
    images_per_s: float | None
    median_step_s: float | None = None  # steady-state step time, not swayed by a slow first step or a busy machine
    images: int = 0
    seconds: float = 0.0
    scheduler: str = "none"
    lrs: tuple[float, ...] = ()  # the learning rate each epoch of the phase used


@dataclass(frozen=True)
class Diverged:
    """An overfit attempt given up: at ``lr`` the loss went from ``first`` to ``loss`` at ``step`` (1-based)."""

    lr: float
    step: int
    first: float
    loss: float


@dataclass(frozen=True)
class OverfitRun:
    """The overfit-one-batch run: the loss and batch accuracy at each step, then once more after the last step.

    ``lr`` is the rate of that run; ``diverged`` the attempts at higher rates given up before it
    (the rate is lowered only when ``--lr`` was not given; see train.overfit_one_batch).
    """

    losses: tuple[float, ...]
    accuracies: tuple[float, ...]
    final_loss: float | None
    final_accuracy: float | None
    trainable: int
    error: str | None = None
    lr: float | None = None
    diverged: tuple[Diverged, ...] = ()


@dataclass(frozen=True)
class Check:
    name: str
    status: str
    detail: str


@dataclass(frozen=True)
class ProgressEvent:
    phase: str
    epoch: int
    step: int
    steps: int
    loss: float
    images_per_s: float
    epochs: int = 0  # of the whole run (0: not known)
    eta_s: float | None = None  # until the last training step


@dataclass(frozen=True)
class Setup:
    """What is known before training starts: the load and freeze tables (the CLI prints them then)."""

    checkpoint: str
    arch: str
    device: str
    data: str
    image_size: int
    load: LoadReport
    head: HeadChange | None
    params: tuple[ModuleParams, ...]
    world_size: int = 1
    num_classes: int | None = None  # the head's outputs (--num-classes, or the model's own head); None: not known
    forward_size: int | None = None  # the forward pass's image size when training uses a smaller one


@dataclass(frozen=True)
class FinetuneReport:
    """What ``finetune-check`` found; ``passed`` is False when any check failed."""

    checkpoint: str
    arch: str
    device: str
    data: str
    image_size: int
    num_classes: int | None
    load: LoadReport
    head: HeadChange | None
    params: tuple[ModuleParams, ...]
    phases: tuple[Phase, ...]
    checks: tuple[Check, ...]
    losses: tuple[float, ...]
    overfit_losses: tuple[float, ...]
    accuracy_before: float | None
    accuracy_after: float | None
    images_per_s: float | None
    peak_rss_bytes: int
    peak_cuda_bytes: int | None
    frozen_bn: tuple[str, ...]
    frozen_bn_updated: tuple[str, ...]
    saved: str | None = None
    plot: str | None = None
    epochs: tuple[Epoch, ...] = ()  # epoch 0 is the held-out evaluation before training
    overfit: OverfitRun | None = None
    world_size: int = 1
    forward_size: int | None = None  # the forward pass's image size when training uses a smaller one

    @property
    def passed(self) -> bool:
        return all(c.status != FAIL for c in self.checks)

    @property
    def failed(self) -> tuple[Check, ...]:
        return tuple(c for c in self.checks if c.status == FAIL)

    @property
    def setup(self) -> Setup:
        return Setup(
            self.checkpoint,
            self.arch,
            self.device,
            self.data,
            self.image_size,
            self.load,
            self.head,
            self.params,
            self.world_size,
            self.num_classes,
            self.forward_size,
        )

    def to_json(self) -> dict[str, Any]:
        out = {f.name: getattr(self, f.name) for f in fields(self)}
        out["passed"] = self.passed
        return out


TrainingProgress = Callable[[ProgressEvent], None]
OnSetup = Callable[[Setup], None]


CHECK_NAMES = (
    "weights loaded",
    "forward pass",
    "training runs",
    "loss finite",
    "overfit one batch",
    "frozen unchanged",
    "trainable changed",
    "gradients",
    "frozen BatchNorm stats",
    "epoch loss",
    "held-out accuracy",
    "throughput",
    "peak memory",
)
# the checks only a run on more than one process makes
DISTRIBUTED_CHECKS = ("frozen identical on ranks", "gradients all-reduced", "loss finite on all ranks")


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


def _some(items: list[str], limit: int = 4) -> str:
    more = f" (+{len(items) - limit} more)" if len(items) > limit else ""
    return ", ".join(items[:limit]) + more


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{value:.1%}"
