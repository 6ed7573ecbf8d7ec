"""Verdicts: each check as pass / fail / info from what loading and training saw."""

from __future__ import annotations

import math
import resource
import sys
from typing import Any

from .report import FAIL, INFO, PASS, SKIP, Check, Phase, _some
from .train import _Tracker

OVERFIT_MARGIN = 0.7  # the fixed batch's last loss must fall below 70% of its first


def _finite_check(tracker: _Tracker, losses: list[float]) -> Check:
    if tracker.nonfinite:
        return Check("loss finite", FAIL, tracker.nonfinite)
    if not losses:
        return Check("loss finite", SKIP, "no training step ran")
    return Check("loss finite", PASS, f"{len(losses)} steps, {min(losses):.4f} to {max(losses):.4f}")


def _overfit_check(losses: list[float]) -> Check:
    if len(losses) < 2:
        return Check("overfit one batch", FAIL if losses else SKIP, "fewer than 2 steps ran")
    # the best of the last three: one noisy step (small batches, BatchNorm) should not decide it
    first, last = losses[0], min(losses[-3:])
    text = f"loss {first:.4f} -> {last:.4f} in {len(losses)} steps on one batch"
    if not all(math.isfinite(v) for v in losses):
        return Check("overfit one batch", FAIL, text + " (not finite)")
    if last > first * OVERFIT_MARGIN:
        return Check("overfit one batch", FAIL, text + f" (needs below {OVERFIT_MARGIN:.0%} of the first; "
                                                       "try a higher --lr or more --overfit-steps)")
    return Check("overfit one batch", PASS, text)


def _param_checks(tracker: _Tracker, trained: bool) -> dict[str, Check]:
    if not trained:
        return {}
    frozen = Check("frozen unchanged", FAIL, "changed: " + _some(tracker.frozen_changed)) if tracker.frozen_changed \
        else Check("frozen unchanged", PASS, f"{tracker.frozen} frozen tensors bit-identical")
    trainable = Check("trainable changed", FAIL, "unchanged: " + _some(tracker.trainable_unchanged)) \
        if tracker.trainable_unchanged else Check("trainable changed", PASS, f"{tracker.trainable} tensors changed")
    problems = []
    if tracker.no_grad:
        problems.append("no gradient reached " + _some(tracker.no_grad))
    if tracker.frozen_grad:
        problems.append("frozen tensors got gradients: " + _some(tracker.frozen_grad))
    grads = Check("gradients", FAIL, "; ".join(problems)) if problems else Check(
        "gradients", PASS, f"all {tracker.trainable} trainable tensors, none of {tracker.frozen} frozen")
    return {c.name: c for c in (frozen, trainable, grads)}


def _bn_check(frozen_bn: list[str], updated: tuple[str, ...], freeze_bn: bool) -> Check:
    if not frozen_bn:
        return Check("frozen BatchNorm stats", INFO, "no frozen BatchNorm layers")
    if updated:
        hint = "" if freeze_bn else "; --freeze-bn keeps them in eval mode"
        return Check("frozen BatchNorm stats", INFO, f"running stats of {len(updated)}/{len(frozen_bn)} frozen "
                                                     f"BatchNorm layers were updated (training mode){hint}")
    return Check("frozen BatchNorm stats", INFO, f"running stats of {len(frozen_bn)} frozen BatchNorm layers unchanged")


def _throughput(phases: list[Phase]) -> float | None:
    seconds = sum(p.seconds for p in phases)
    return sum(p.images for p in phases) / seconds if seconds else None


def _peak_rss() -> int:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


def _peak_cuda(device: Any) -> int | None:
    import torch

    return int(torch.cuda.max_memory_allocated(device)) if device.type == "cuda" else None

