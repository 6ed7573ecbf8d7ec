"""The frozen results of ``finetune-check``: the load report, phases, checks and the whole report."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, fields
from typing import Any

PASS, FAIL, INFO, SKIP = "pass", "fail", "info", "skip"


@dataclass(frozen=True)
class Mismatch:
    key: str
    checkpoint_shape: tuple[int, ...]
    model_shape: tuple[int, ...]


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
    module: str
    trainable: int
    frozen: int


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

    @property
    def passed(self) -> bool:
        return all(c.status != FAIL for c in self.checks)

    @property
    def failed(self) -> tuple[Check, ...]:
        return tuple(c for c in self.checks if c.status == FAIL)

    def to_json(self) -> dict[str, Any]:
        out = {f.name: getattr(self, f.name) for f in fields(self)}
        out["passed"] = self.passed
        return out


Progress = Callable[[ProgressEvent], None]


CHECK_NAMES = (
    "weights loaded", "forward pass", "training runs", "loss finite", "overfit one batch", "frozen unchanged",
    "trainable changed", "gradients", "frozen BatchNorm stats", "epoch loss", "held-out accuracy", "throughput",
    "peak memory",
)



def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


def _some(items: list[str], limit: int = 4) -> str:
    more = f" (+{len(items) - limit} more)" if len(items) > limit else ""
    return ", ".join(items[:limit]) + more


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{value:.1%}"
