"""The training loop (phases, epochs, schedulers, held-out evaluation), and the overfit-one-batch run."""

from __future__ import annotations

import contextlib
import math
import statistics
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from .distributed import Ranks
from .freeze import PhaseSpec
from .options import FinetuneOptions
from .probe import _logits, _loss
from .report import Diverged, Epoch, OverfitRun, Phase, ProgressEvent, TrainingProgress, _first_line


class Tracker:
    """What the training loop saw, gathered for the checks (tensor names in sets: a phase repeats names)."""

    def __init__(self, total_steps: int = 0) -> None:
        self.nonfinite: str | None = None
        self.nonfinite_ranks: list[int] = []
        self.frozen_changed: dict[str, None] = {}
        self.trainable_unchanged: dict[str, None] = {}
        self.no_grad: dict[str, None] = {}
        self.frozen_grad: dict[str, None] = {}
        self.frozen: set[str] = set()  # frozen in some phase
        self.trainable: set[str] = set()  # trainable in some phase
        self.frozen_bn: dict[str, None] = {}  # BatchNorm layers frozen in some phase, in model order
        self.bn_updated: set[str] = set()  # ... whose running stats moved while they were frozen
        self.rank_differing: dict[str, None] = {}  # frozen tensors that differ between ranks
        self.grads_differing: dict[str, None] = {}  # gradients that differ between ranks after the all-reduce
        self.grads_compared = 0
        self.total_steps = total_steps
        self.steps_done = 0
        self.train_seconds = 0.0
        self.resumed: tuple[int, int] | None = None  # --resume-optimizer: (parameters resumed, starting fresh)


def autocast(device: Any, amp: bool) -> Any:
    import torch

    if amp:
        return lambda: torch.autocast(device.type, dtype=torch.float16)
    return contextlib.nullcontext


def _optimizer(name: str, params: list[Any], lr: float) -> Any:
    import torch

    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=0.9)
    return torch.optim.Adam(params, lr=lr)


def _scheduler(opts: FinetuneOptions, optimizer: Any, epochs: int) -> Any:
    import torch

    sched = torch.optim.lr_scheduler
    if opts.scheduler == "plateau":
        return sched.ReduceLROnPlateau(
            optimizer, mode="min", factor=opts.plateau_factor, patience=opts.plateau_patience
        )
    if opts.scheduler == "cosine":
        return sched.CosineAnnealingLR(optimizer, T_max=max(epochs, 1))
    if opts.scheduler == "step":
        return sched.StepLR(optimizer, step_size=opts.step_size, gamma=opts.step_gamma)
    return None


def train_phase(
    model: Any,
    net: Any,
    spec: PhaseSpec,
    data: Any,
    heldout: Any,
    opts: FinetuneOptions,
    device: Any,
    amp: Any,
    tracker: Tracker,
    losses: list[float],
    progress: TrainingProgress | None,
    ranks: Ranks,
    first_epoch: int,
    total_epochs: int,
    resume: Any = None,
    bn: BnSource | None = None,
) -> tuple[Phase, list[Epoch]]:
    """One phase: ``spec.epochs`` epochs of ``net`` (``model``, or its DDP wrapper) with a fresh optimizer
    and scheduler; held-out loss and accuracy after each epoch; the parameter snapshots for the checks."""
    import torch

    named = list(model.named_parameters())
    trainable = spec.trainable
    train_params = [p for n, p in named if n in trainable]
    frozen_named = [(n, p) for n, p in named if n not in trainable]
    before = {n: p.detach().to("cpu", copy=True) for n, p in named}
    optimizer = _optimizer(opts.optimizer, train_params, spec.lr)
    if resume is not None:  # --resume-optimizer: the first phase starts from the saved state
        from .resume import apply_resume

        tracker.resumed = apply_resume(optimizer, named, resume)
    scheduler = _scheduler(opts, optimizer, spec.epochs)
    scaler = torch.amp.GradScaler(device.type) if opts.amp else None
    steps_per_epoch = min(len(data), opts.max_steps) if opts.max_steps else len(data)
    reached: set[str] = set()
    frozen_bn_names = _frozen_batchnorms(model)
    bn_before = {n: _bn_stats(model.get_submodule(n)) for n in frozen_bn_names}
    frozen_bn = kept_batchnorms(model, opts)
    epoch_losses: list[float] = []
    rows: list[Epoch] = []
    lrs: list[float] = []
    step_times: list[float] = []
    first_step = len(losses)
    images = 0
    elapsed = 0.0
    for epoch in range(spec.epochs):
        sampler: Any = getattr(data, "sampler", None)
        if hasattr(sampler, "set_epoch"):
            sampler.set_epoch(first_epoch + epoch)
        lr = float(optimizer.param_groups[0]["lr"])
        lrs.append(lr)
        net.train()
        for layer in frozen_bn:
            layer.eval()
        total, count, epoch_images = 0.0, 0, 0
        start = tick = time.perf_counter()
        for step, (x, y) in enumerate(data):
            if step >= steps_per_epoch:
                break
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            optimizer.zero_grad(set_to_none=True)
            with amp():
                loss = _loss(net(x), y)
            if scaler is not None:
                scaler.scale(loss).backward()
            else:
                loss.backward()
            for n, p in named:
                if p.grad is not None:
                    reached.add(n)
            if step == 0 and ranks.distributed:
                # DDP averages the gradients in backward(): every rank must now hold the same ones
                grads = [(n, p.grad) for n, p in named if p.grad is not None]
                tracker.grads_differing.update(dict.fromkeys(ranks.differing(grads)))
                tracker.grads_compared += len(grads)
            if scaler is not None:
                scaler.step(optimizer)
                scaler.update()
            else:
                optimizer.step()
            value = loss.item()
            now = time.perf_counter()
            step_times.append(now - tick)
            tick = now
            losses.append(value)
            images += len(y)
            epoch_images += len(y)
            tracker.steps_done += 1
            # every rank stops at the same step, or the others would wait for it in the next all-reduce
            if ranks.any(not math.isfinite(value), device):
                if not math.isfinite(value):
                    tracker.nonfinite_ranks.append(ranks.rank)
                where = f" on rank {ranks.rank}" if ranks.distributed and not math.isfinite(value) else ""
                tracker.nonfinite = (
                    f"loss is {value} at step {len(losses)} (phase {spec.name}, epoch {first_epoch + epoch + 1}){where}"
                    if not math.isfinite(value)
                    else f"loss is not finite on another rank at step {len(losses)} (phase {spec.name}, "
                    f"epoch {first_epoch + epoch + 1})"
                )
                break
            total += value
            count += 1
            if progress is not None:
                seconds = elapsed + now - start
                done_s = tracker.train_seconds + seconds
                left = tracker.total_steps - tracker.steps_done
                eta = done_s / tracker.steps_done * left if tracker.steps_done else None
                progress(
                    ProgressEvent(
                        spec.name,
                        first_epoch + epoch + 1,
                        step + 1,
                        steps_per_epoch,
                        value,
                        images / seconds if seconds else 0.0,
                        total_epochs,
                        eta,
                    )
                )
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        seconds = time.perf_counter() - start
        elapsed += seconds
        tracker.train_seconds += seconds
        if count:
            epoch_losses.append(total / count)
        # a non-finite loss ends training: the epoch's row has no held-out figures
        held_loss, held_acc = (
            (None, None)
            if tracker.nonfinite
            else evaluate(model, heldout, opts.eval_batches, device, amp, ranks, bn, frozen_bn)
        )
        rows.append(
            Epoch(
                spec.name,
                first_epoch + epoch + 1,
                lr,
                count,
                total / count if count else None,
                held_loss,
                held_acc,
                epoch_images / seconds if seconds else None,
            )
        )
        if tracker.nonfinite:
            break
        if scheduler is not None:
            if opts.scheduler == "plateau":
                if held_loss is not None:
                    scheduler.step(held_loss)
            else:
                scheduler.step()
    for n, p in named:
        same = torch.equal(p.detach().cpu(), before[n])
        if n in trainable and same:
            tracker.trainable_unchanged[n] = None
        elif n not in trainable and not same:
            tracker.frozen_changed[n] = None
    tracker.rank_differing.update(dict.fromkeys(ranks.differing(frozen_named)))
    tracker.no_grad.update(dict.fromkeys(n for n, _ in named if n in trainable and n not in reached))
    tracker.frozen_grad.update(dict.fromkeys(n for n, _ in frozen_named if n in reached))
    tracker.frozen.update(n for n, _ in frozen_named)
    tracker.trainable.update(n for n, _ in named if n in trainable)
    tracker.frozen_bn.update(dict.fromkeys(frozen_bn_names))
    tracker.bn_updated.update(
        n for n in frozen_bn_names if not _same_stats(bn_before[n], _bn_stats(model.get_submodule(n)))
    )
    phase = Phase(
        spec.name,
        spec.epochs,
        spec.lr,
        sum(p.numel() for p in train_params),
        sum(p.numel() for _, p in frozen_named),
        len(losses) - first_step,
        tuple(epoch_losses),
        images / elapsed if elapsed else None,
        statistics.median(step_times) if step_times else None,
        images,
        elapsed,
        opts.scheduler,
        tuple(lrs),
    )
    return phase, rows


@dataclass(frozen=True)
class BnSource:
    """The training images evaluation re-estimates BatchNorm statistics on (``--eval-bn reestimate``).

    A sanity run's few steps leave the running averages mostly the checkpoint's (at momentum 0.1,
    8 steps move them 57% of the way), so held-out figures taken with them measure stale
    statistics, not the weights: a randomly initialised resnet18 whose training loss falls from
    2.5 to 0.02 in 8 steps scores chance on held-out images with a held-out loss of 35. Evaluation
    therefore recomputes each BatchNorm's statistics as a plain average over ``images`` training
    images in whole batches, a fixed sample drawn by ``seed`` (the same images on every rank and
    for every evaluation; a dataset's own augmentation draws afresh), as
    ``torch.optim.swa_utils.update_bn`` does after averaging weights.
    """

    dataset: Any
    images: int
    batch_size: int
    seed: int

    @classmethod
    def from_options(cls, dataset: Any, opts: FinetuneOptions) -> BnSource | None:
        if opts.eval_bn != "reestimate":
            return None
        images = min(len(dataset), opts.batch_size * opts.eval_batches)
        if images > opts.batch_size:
            images -= images % opts.batch_size  # whole batches: a last batch of one image has no statistics
        return cls(dataset, images, opts.batch_size, opts.seed) if images > 1 else None


def reestimated_batchnorms(model: Any, source: BnSource | None, keep: Sequence[Any] = ()) -> list[Any]:
    """The BatchNorm layers evaluation re-estimates: every one that tracks running statistics, but
    those ``--freeze-bn`` keeps in eval mode (``keep``): their statistics are the ones meant."""
    if source is None or not source.images:
        return []
    from torch import nn

    kept = {id(m) for m in keep}
    return [
        m
        for m in model.modules()
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats and id(m) not in kept
    ]


@contextlib.contextmanager
def _bn_reestimated(model: Any, source: BnSource | None, keep: Sequence[Any], device: Any, amp: Any) -> Iterator[None]:
    """Within the block, ``reestimated_batchnorms`` hold statistics of ``source``'s images; afterwards
    the buffers the run left are put back in place (training, ``--save`` and the frozen-BatchNorm check
    see them unchanged), and no random state of the run has moved."""
    import torch

    layers = reestimated_batchnorms(model, source, keep)
    if not layers or source is None:
        yield
        return
    saved = [(m.momentum, [b.detach().clone() for b in _bn_buffers(m)]) for m in layers]
    cuda = [device] if device.type == "cuda" else []
    try:
        with torch.random.fork_rng(devices=cuda), torch.no_grad():
            order = torch.randperm(len(source.dataset), generator=torch.Generator().manual_seed(source.seed))
            chosen = order[: source.images].tolist()
            model.eval()
            for m in layers:
                m.reset_running_stats()
                m.momentum = None  # a cumulative average over the batches below
                m.train()
            for at in range(0, len(chosen), source.batch_size):
                x = torch.stack([source.dataset[i][0] for i in chosen[at : at + source.batch_size]])
                with amp():
                    model(x.to(device))
            model.eval()
        yield
    finally:
        for m, (momentum, buffers) in zip(layers, saved):
            m.eval()  # as evaluation found them, also when a forward above raised
            m.momentum = momentum
            for live, old in zip(_bn_buffers(m), buffers):
                live.copy_(old)


def _bn_buffers(bn: Any) -> list[Any]:
    return [b for b in (bn.running_mean, bn.running_var, bn.num_batches_tracked) if b is not None]


def evaluate(
    model: Any,
    data: Any,
    batches: int,
    device: Any,
    amp: Any,
    ranks: Ranks | None = None,
    bn: BnSource | None = None,
    keep_bn: Sequence[Any] = (),
) -> tuple[float | None, float | None]:
    """Held-out mean loss and accuracy over at most ``batches`` batches (each rank's shard, summed over ranks);
    with ``bn``, BatchNorm statistics re-estimated on training images for the evaluation (``BnSource``)."""
    import torch

    model.eval()
    loss_sum = 0.0
    correct = total = 0
    failed = False
    try:
        with _bn_reestimated(model, bn, keep_bn, device, amp), torch.no_grad():
            for i, (x, y) in enumerate(data):
                if i >= batches:
                    break
                x, y = x.to(device), y.to(device)
                with amp():
                    out = model(x)
                    loss = _loss(out, y)
                loss_sum += float(loss) * len(y)
                correct += int((_logits(out).argmax(dim=1) == y).sum())
                total += len(y)
    except (RuntimeError, ValueError):
        failed = True
    if ranks is not None and ranks.distributed:
        loss_sum, correct_f, total_f, failures = ranks.sum([loss_sum, correct, total, float(failed)], device)
        correct, total, failed = int(correct_f), int(total_f), failures > 0
    if failed or not total:
        return None, None
    return loss_sum / total, correct / total


Relabel = Callable[[int, Any], Any]  # (step, labels) -> the labels that step trains on
Agree = Callable[[bool], bool]  # a flag of this rank -> whether any rank raised it

DIVERGED = 10.0  # a step's loss over the first: the run diverged (checks.overfit_verdict)
BACKOFF = 10.0  # the rate is divided by this when a run at the default rate diverges ...
BACKOFFS = 2  # ... at most this many times (1e-3, 1e-4, 1e-5)


def overfit_lrs(lr: float, given: bool) -> list[float]:
    """The rates the overfit check may try, in order: the one given alone, else the default and lower ones."""
    return [lr] if given else [lr / BACKOFF**i for i in range(BACKOFFS + 1)]


def overfit_one_batch(
    model: Any,
    batch: tuple[Any, Any],
    steps: int,
    optimizer: str,
    lrs: float | list[float],
    device: Any,
    amp: Any = None,
    relabel: Relabel | None = None,
    net: Any = None,
    agree: Agree | None = None,
) -> OverfitRun:
    """Train on one fixed batch for ``steps`` steps; the model's weights and flags are restored afterwards.

    Dropout is off during the run (every module keeps its mode otherwise, so BatchNorm uses the
    batch's statistics): memorising a batch is a test of the wiring, and dropout's draws are the
    noise that made a fixed-threshold verdict flip from seed to seed. ``relabel`` lets a test
    feed the labels a broken pipeline would (shuffled at every step). ``net`` is the module to run
    (a DDP wrapper of ``model``, whose gradients are then averaged over the ranks).

    ``lrs`` (see :func:`overfit_lrs`): when a step's loss rises above ``DIVERGED`` times the first
    (or is not finite) and a lower rate is left, the attempt stops there, the weights are restored
    and the run starts again at the next rate. A model without normalisation layers can take
    Adam's 1e-3 badly: vgg16 with random weights goes from 2.3 to 259-549 at the second step, and
    never recovers in 20 steps, where 1e-4 memorises the batch (docs/commands/finetune-check.md).
    ``agree`` makes every rank take the same decision (their losses differ: each has its shard).
    """
    import torch
    from torch import nn

    amp = amp or contextlib.nullcontext
    rates = [lrs] if isinstance(lrs, float | int) else list(lrs)
    x, y = batch
    x, y = x.to(device), y.to(device)
    # a snapshot rather than a deepcopy: user models may hold things that cannot be copied
    saved = {k: v.detach().clone() for k, v in model.state_dict(keep_vars=True).items()}
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    modes = {n: m.training for n, m in model.named_modules()}
    params = [p for p in model.parameters() if p.requires_grad]
    model.train()
    for m in model.modules():
        if isinstance(m, nn.modules.dropout._DropoutNd):
            m.eval()
    losses: list[float] = []
    accuracies: list[float] = []
    given_up: list[Diverged] = []
    final_loss = final_accuracy = None
    error = None
    lr = rates[0]

    def labels(step: int) -> Any:
        return relabel(step, y) if relabel is not None else y

    try:
        for attempt, lr in enumerate(rates):
            if attempt:
                model.load_state_dict(saved)
                for p in params:
                    p.grad = None
            losses, accuracies = [], []
            if not params:
                break
            opt = _optimizer(optimizer, params, lr)
            last_try = attempt == len(rates) - 1
            for step in range(steps):
                opt.zero_grad(set_to_none=True)
                target = labels(step)
                with amp():
                    out = (net or model)(x)
                    loss = _loss(out, target)
                loss.float().backward()
                opt.step()
                value = loss.item()
                losses.append(value)
                accuracies.append(_batch_accuracy(out, target))
                if last_try:
                    continue
                bad = not math.isfinite(value) or value > losses[0] * DIVERGED
                if agree(bad) if agree is not None else bad:
                    given_up.append(Diverged(lr, step + 1, losses[0], value))
                    break
            else:
                break
        with torch.no_grad(), amp():
            target = labels(steps)
            out = model(x)
            final_loss = _loss(out, target).item()
            final_accuracy = _batch_accuracy(out, target)
    except (RuntimeError, ValueError, IndexError) as exc:
        error = f"{type(exc).__name__}: {_first_line(exc)}"
    finally:
        model.load_state_dict(saved)
        for name, p in model.named_parameters():
            p.grad = None
            p.requires_grad_(flags[name])
        for name, m in model.named_modules():
            m.train(modes[name])
    return OverfitRun(
        tuple(losses), tuple(accuracies), final_loss, final_accuracy, len(params), error, lr, tuple(given_up)
    )


def _batch_accuracy(out: Any, labels: Any) -> float:
    return float((_logits(out).detach().argmax(dim=1) == labels).float().mean())


def kept_batchnorms(model: Any, opts: FinetuneOptions) -> list[Any]:
    """The BatchNorm layers ``--freeze-bn`` holds in eval mode now: those whose parameters are all frozen."""
    return [model.get_submodule(n) for n in _frozen_batchnorms(model)] if opts.freeze_bn else []


def _frozen_batchnorms(model: Any) -> list[str]:
    from torch import nn

    out = []
    for name, m in model.named_modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats:
            params = list(m.parameters())
            if params and not any(p.requires_grad for p in params):
                out.append(name)
    return out


def _bn_stats(bn: Any) -> tuple[Any, ...]:
    return tuple(b.detach().to("cpu", copy=True) for b in (bn.running_mean, bn.running_var) if b is not None)


def _same_stats(a: tuple[Any, ...], b: tuple[Any, ...]) -> bool:
    import torch

    return all(torch.equal(x, y) for x, y in zip(a, b))
