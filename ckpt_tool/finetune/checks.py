"""Verdicts: each check as pass / fail / info from what loading and training saw."""

from __future__ import annotations

import math
import resource
import sys
from typing import Any

from .distributed import Ranks
from .report import DISTRIBUTED_CHECKS, FAIL, INFO, PASS, SKIP, Check, OverfitRun, Phase, _some
from .train import DIVERGED, Tracker

OVERFIT_ACCURACY = 0.5  # batch accuracy after the run; see overfit_verdict
OVERFIT_RATIO = 0.7  # the final loss over the first


def overfit_verdict(run: OverfitRun, classes: int) -> Check:
    """PASS when, after ``--overfit-steps`` (20) steps on one fixed batch with dropout off, the loss
    measured once more is at most 70% of the first step's and the batch accuracy at least 50%.

    Chosen from measurements (bench/measure_overfit.py, seeds 0-9): healthy setups end at a loss
    ratio of 0.0001 (resnet18, all trainable) to 0.24 (resnet18, head only, 64 px) and 0.62 (the
    docs' tiny_cnn, head only, 30 steps), with batch accuracy 1.0, 1.0 and >= 0.62; labels shuffled at
    every step end at >= 0.77 and <= 0.44; lr 1e6 and a detached head never go below 1.0.
    The thresholds sit between the worst healthy run and the best broken one.

    A run whose loss rose above 10x the first at any step diverged, and fails even when it ends
    on a memorised batch: with only the head trainable, lr 1e6 (SGD) drives the logits so far that
    the batch is "learnt" (loss 0.0000) after a peak of 5e6x the first loss. Healthy runs of the
    test recipes peak at 1.06x the first (tests/test_finetune_gate.py, seeds 0-9).

    Without ``--lr``, a diverging run is tried again at lower rates (train.overfit_one_batch: vgg16
    at Adam's default 1e-3 reaches 112-456x the first loss at step 2, and passes at 1e-4 for seeds
    0-9); the verdict is on the last attempt and names those given up.
    """
    name = "overfit one batch"
    if run.error:
        return Check(name, FAIL, f"training on one batch failed: {run.error}")
    if not run.trainable:
        return Check(name, FAIL, "no parameter is trainable: nothing can learn the batch")
    if not run.losses or run.final_loss is None or run.final_accuracy is None:
        return Check(name, SKIP, "no step ran")
    first, last = run.losses[0], run.final_loss
    text = (
        f"loss {first:.4f} -> {last:.4f}, batch accuracy {run.accuracies[0]:.0%} -> {run.final_accuracy:.0%} "
        f"in {len(run.losses)} steps"
    )
    if run.diverged:
        text += (
            f" at lr {run.lr:g} ("
            + "; ".join(
                f"at {d.lr:g} the loss went {d.first:.4g} -> {d.loss:.4g} at step {d.step}" for d in run.diverged
            )
            + f"; training used {run.diverged[0].lr:g}: --lr {run.lr:g} trains at this rate)"
        )
    if not all(math.isfinite(v) for v in (*run.losses, last)):
        return Check(name, FAIL, text + " (not finite)")
    peak = max(run.losses)
    if peak > first * DIVERGED:
        return Check(
            name,
            FAIL,
            text + f" (diverged: the loss reached {peak:.4g}, over {DIVERGED:g}x the first; try a lower --lr)",
        )
    if run.final_accuracy < OVERFIT_ACCURACY or last > first * OVERFIT_RATIO:
        return Check(
            name,
            FAIL,
            text + f" (needs batch accuracy >= {OVERFIT_ACCURACY:.0%} and the loss below "
            f"{OVERFIT_RATIO:.0%} of the first; try another --lr or more --overfit-steps)",
        )
    return Check(name, PASS, text)


def finite_check(tracker: Tracker, losses: list[float]) -> Check:
    if tracker.nonfinite:
        return Check("loss finite", FAIL, tracker.nonfinite)
    if not losses:
        return Check("loss finite", SKIP, "no training step ran")
    return Check("loss finite", PASS, f"{len(losses)} steps, {min(losses):.4f} to {max(losses):.4f}")


def param_checks(tracker: Tracker, trained: bool) -> dict[str, Check]:
    """frozen unchanged, trainable changed, gradients; each tensor counted once however many phases it was in."""
    if not trained:
        return {}
    frozen = (
        Check("frozen unchanged", FAIL, "changed: " + _some(list(tracker.frozen_changed)))
        if tracker.frozen_changed
        else Check("frozen unchanged", PASS, f"{len(tracker.frozen)} frozen tensors bit-identical")
    )
    trainable = (
        Check("trainable changed", FAIL, "unchanged: " + _some(list(tracker.trainable_unchanged)))
        if tracker.trainable_unchanged
        else Check("trainable changed", PASS, f"{len(tracker.trainable)} tensors changed")
    )
    problems = []
    if tracker.no_grad:
        problems.append("no gradient reached " + _some(list(tracker.no_grad)))
    if tracker.frozen_grad:
        problems.append("frozen tensors got gradients: " + _some(list(tracker.frozen_grad)))
    grads = (
        Check("gradients", FAIL, "; ".join(problems))
        if problems
        else Check(
            "gradients", PASS, f"all {len(tracker.trainable)} trainable tensors, none of {len(tracker.frozen)} frozen"
        )
    )
    return {c.name: c for c in (frozen, trainable, grads)}


def distributed_checks(tracker: Tracker, ranks: Ranks, trained: bool) -> dict[str, Check]:
    """The checks of a run on more than one process: what DDP promises, seen from every rank."""
    if not ranks.distributed:
        return {}
    if not trained:
        return {name: Check(name, SKIP, "no training step ran") for name in DISTRIBUTED_CHECKS}
    out = [
        Check("frozen identical on ranks", FAIL, "differ between ranks: " + _some(list(tracker.rank_differing)))
        if tracker.rank_differing
        else Check(
            "frozen identical on ranks",
            PASS,
            f"{len(tracker.frozen)} frozen tensors bit-identical on all {ranks.world} ranks",
        ),
        Check(
            "gradients all-reduced",
            FAIL,
            "gradients differ between ranks after backward(): " + _some(list(tracker.grads_differing)),
        )
        if tracker.grads_differing
        else Check(
            "gradients all-reduced",
            PASS,
            f"{tracker.grads_compared} gradients identical on all {ranks.world} ranks ({ranks.backend})",
        ),
        Check("loss finite on all ranks", FAIL, tracker.nonfinite)
        if tracker.nonfinite
        else Check("loss finite on all ranks", PASS, f"every step on all {ranks.world} ranks"),
    ]
    return {c.name: c for c in out}


def bn_check(frozen_bn: list[str], updated: tuple[str, ...], freeze_bn: bool) -> Check:
    if not frozen_bn:
        return Check("frozen BatchNorm stats", INFO, "no frozen BatchNorm layers")
    if updated:
        hint = "" if freeze_bn else "; --freeze-bn keeps them in eval mode"
        return Check(
            "frozen BatchNorm stats",
            INFO,
            f"running stats of {len(updated)}/{len(frozen_bn)} frozen "
            f"BatchNorm layers were updated (training mode){hint}",
        )
    return Check("frozen BatchNorm stats", INFO, f"running stats of {len(frozen_bn)} frozen BatchNorm layers unchanged")


def throughput(phases: list[Phase], ranks: Ranks | None = None, device: Any = None) -> float | None:
    """Training images/s of all phases: on several ranks, all their images over the slowest rank's time."""
    images: float = sum(p.images for p in phases)
    seconds = sum(p.seconds for p in phases)
    if ranks is not None and ranks.distributed:
        images = ranks.sum([images], device)[0]
        seconds = ranks.max(seconds, device)
    return images / seconds if seconds else None


def peak_rss() -> int:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


def peak_cuda(device: Any) -> int | None:
    import torch

    return int(torch.cuda.max_memory_allocated(device)) if device.type == "cuda" else None
