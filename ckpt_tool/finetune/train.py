"""The training loop, the overfit-one-batch run and held-out evaluation."""

from __future__ import annotations

import math
import statistics
import time
from typing import Any

from .options import FinetuneOptions
from .probe import _logits, _loss
from .report import Phase, Progress, ProgressEvent


class _Tracker:
    """What the training loop saw, gathered for the checks."""

    def __init__(self) -> None:
        self.nonfinite: str | None = None
        self.frozen_changed: list[str] = []
        self.trainable_unchanged: list[str] = []
        self.no_grad: list[str] = []
        self.frozen_grad: list[str] = []
        self.frozen = 0
        self.trainable = 0
        self.frozen_bn: dict[str, None] = {}  # BatchNorm layers frozen in some phase, in model order
        self.bn_updated: set[str] = set()  # ... whose running stats moved while they were frozen


def _autocast(device: Any, amp: bool) -> Any:
    import contextlib

    import torch

    if amp:
        return lambda: torch.autocast(device.type, dtype=torch.float16)
    return contextlib.nullcontext


def _optimizer(name: str, params: list[Any], lr: float) -> Any:
    import torch

    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=0.9)
    return torch.optim.Adam(params, lr=lr)


def _train_phase(model: Any, name: str, trainable: frozenset[str], epochs: int, lr: float, data: Any,
                 opts: FinetuneOptions, device: Any, amp: Any, tracker: _Tracker, losses: list[float],
                 progress: Progress | None) -> Phase:
    import torch

    named = list(model.named_parameters())
    train_params = [p for n, p in named if n in trainable]
    frozen_named = [(n, p) for n, p in named if n not in trainable]
    before = {n: p.detach().to("cpu", copy=True) for n, p in named}
    optimizer = _optimizer(opts.optimizer, train_params, lr)
    scaler = torch.amp.GradScaler(device.type) if opts.amp else None
    steps_per_epoch = min(len(data), opts.max_steps) if opts.max_steps else len(data)
    reached: set[str] = set()
    frozen_bn_names = _frozen_batchnorms(model)
    bn_before = {n: _bn_stats(model.get_submodule(n)) for n in frozen_bn_names}
    frozen_bn = [model.get_submodule(n) for n in frozen_bn_names] if opts.freeze_bn else []
    epoch_losses: list[float] = []
    step_times: list[float] = []
    first_step = len(losses)
    images = 0
    elapsed = 0.0
    for epoch in range(epochs):
        model.train()
        for bn in frozen_bn:
            bn.eval()
        total, count = 0.0, 0
        start = tick = time.perf_counter()
        for step, (x, y) in enumerate(data):
            if step >= steps_per_epoch:
                break
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            optimizer.zero_grad(set_to_none=True)
            with amp():
                loss = _loss(model(x), y)
            if scaler is not None:
                scaler.scale(loss).backward()
            else:
                loss.backward()
            for n, p in named:
                if p.grad is not None:
                    reached.add(n)
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
            if not math.isfinite(value):
                tracker.nonfinite = f"loss is {value} at step {len(losses)} (phase {name}, epoch {epoch + 1})"
                break
            total += value
            count += 1
            if progress is not None:
                seconds = elapsed + time.perf_counter() - start
                progress(ProgressEvent(name, epoch + 1, step + 1, steps_per_epoch, value,
                                       images / seconds if seconds else 0.0))
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        elapsed += time.perf_counter() - start
        if count:
            epoch_losses.append(total / count)
        if tracker.nonfinite:
            break
    for n, p in named:
        same = torch.equal(p.detach().cpu(), before[n])
        if n in trainable and same:
            tracker.trainable_unchanged.append(n)
        elif n not in trainable and not same:
            tracker.frozen_changed.append(n)
    tracker.no_grad += [n for n in trainable if n not in reached]
    tracker.frozen_grad += [n for n, _ in frozen_named if n in reached]
    tracker.frozen += len(frozen_named)
    tracker.frozen_bn.update(dict.fromkeys(frozen_bn_names))
    tracker.bn_updated.update(n for n in frozen_bn_names
                              if not _same_stats(bn_before[n], _bn_stats(model.get_submodule(n))))
    tracker.trainable += len(train_params)
    return Phase(name, epochs, lr, sum(p.numel() for p in train_params), sum(p.numel() for _, p in frozen_named),
                 len(losses) - first_step, tuple(epoch_losses), images / elapsed if elapsed else None,
                 statistics.median(step_times) if step_times else None, images, elapsed)


def _overfit_one_batch(model: Any, data: Any, opts: FinetuneOptions, device: Any, amp: Any) -> list[float]:
    """Train on one fixed batch and return the losses; the model's state is restored afterwards."""
    x, y = next(iter(data))
    x, y = x.to(device), y.to(device)
    # a snapshot rather than a deepcopy: user models may hold things that cannot be copied
    saved = {k: v.detach().clone() for k, v in model.state_dict(keep_vars=True).items()}
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    model.train()
    optimizer = _optimizer(opts.optimizer, [p for p in model.parameters() if p.requires_grad], opts.lr)
    losses = []
    try:
        for _ in range(opts.overfit_steps):
            optimizer.zero_grad(set_to_none=True)
            with amp():
                loss = _loss(model(x), y)
            loss.float().backward()
            optimizer.step()
            losses.append(loss.item())
    except (RuntimeError, ValueError, IndexError):
        pass  # the training phase reports the error itself
    finally:
        model.load_state_dict(saved)
        for name, p in model.named_parameters():
            p.grad = None
            p.requires_grad_(flags[name])
    return losses


def _accuracy(model: Any, data: Any, batches: int, device: Any, amp: Any) -> float | None:
    import torch

    model.eval()
    correct = total = 0
    try:
        with torch.no_grad():
            for i, (x, y) in enumerate(data):
                if i >= batches:
                    break
                with amp():
                    pred = _logits(model(x.to(device))).argmax(dim=1).cpu()
                correct += int((pred == y).sum())
                total += len(y)
    except (RuntimeError, ValueError):
        return None
    return correct / total if total else None


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

