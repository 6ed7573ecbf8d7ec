"""``finetune_check``: build, load, freeze, probe, train and check, in that order."""

from __future__ import annotations

from typing import Any

from ..arch import build_model
from ..errors import UsageError
from ..reader import open_checkpoint
from ..render import human_bytes, shape_str
from .checks import _bn_check, _finite_check, _overfit_check, _param_checks, _peak_cuda, _peak_rss, _throughput
from .data import _input_channels, _input_spec, _make_data
from .freeze import _apply_trainable, _param_table, _phase_plan
from .head import find_head, replace_head
from .load import _load_check, _load_into, _migrated_state
from .options import FinetuneOptions, _pick_device, _validate
from .output import _plot, _save
from .probe import _probe_forward
from .report import CHECK_NAMES, FAIL, INFO, PASS, SKIP, Check, FinetuneReport, Phase, Progress, _first_line, _pct
from .train import _accuracy, _autocast, _overfit_one_batch, _Tracker, _train_phase


def finetune_check(path: str, arch: str, options: FinetuneOptions | None = None,
                   progress: Progress | None = None) -> FinetuneReport:
    """Load ``path`` into ``arch``, fine-tune it briefly and check every step of the way.

    Args:
        path: a checkpoint of any format ``open_checkpoint`` reads.
        arch: a target as ``--arch`` takes it (``"resnet18"``, ``"pkg.mod:factory"``, ``"file.py:factory"``).
        options: see :class:`FinetuneOptions`.
        progress: called after every training step (the CLI draws its progress bar with it).

    Returns:
        A :class:`FinetuneReport`; failed checks are findings, not exceptions. Bad input raises
        a :class:`CkptError`.

    Example:
        >>> report = finetune_check("resnet18.pth", "resnet18", FinetuneOptions(num_classes=10, trainable=("fc",)))
        >>> report.passed
        True
    """
    opts = options or FinetuneOptions()
    _validate(opts)
    import torch

    device = _pick_device(opts.device, opts.amp)
    ckpt = open_checkpoint(path, opts.key)
    torch.manual_seed(opts.seed)
    model = build_model(arch, opts.arch_args, device="cpu")
    # --head alone only names the head (for --freeze-epochs); --num-classes replaces it
    head = replace_head(model, opts.num_classes, opts.head) if opts.num_classes else None
    head_path = head.module if head else find_head(model, opts.head)
    state, operations, initialised = _migrated_state(ckpt, opts, model)
    load = _load_into(model, state, (head.module, *head.aux) if head else (), operations, initialised)
    del state
    model.to(device)
    phases_spec = _phase_plan(model, opts, (head_path, *head.aux) if head else (head_path,))
    _apply_trainable(model, phases_spec[0][1])
    params = _param_table(model)
    size, mean, std = _input_spec(arch, opts.image_size)
    channels = _input_channels(model)

    checks: dict[str, Check] = {}
    checks["weights loaded"] = _load_check(load, opts.strict, ckpt)
    probe = torch.randn(2, channels, size, size, generator=torch.Generator().manual_seed(opts.seed))
    forward_error, out_classes = _probe_forward(model, probe.to(device))
    base = dict(checkpoint=path, arch=arch, device=str(device), data=opts.data, image_size=size, load=load, head=head,
                params=params)
    if forward_error is not None:
        checks["forward pass"] = Check("forward pass", FAIL, forward_error)
        return _finish(base, checks, opts, rss=_peak_rss(), cuda=_peak_cuda(device))
    checks["forward pass"] = Check("forward pass", PASS, f"{shape_str((2, channels, size, size))} -> [2, {out_classes}]")
    train_data, heldout, data_classes = _make_data(opts, size, channels, out_classes, mean, std)
    if data_classes > out_classes:
        raise UsageError(f"--data {opts.data} has {data_classes} classes but the model outputs {out_classes} logits",
                         hint=f"pass --num-classes {data_classes}")

    amp = _autocast(device, opts.amp)
    accuracy_before = _accuracy(model, heldout, opts.eval_batches, device, amp)
    overfit = _overfit_one_batch(model, train_data, opts, device, amp)

    phases: list[Phase] = []
    losses: list[float] = []
    tracker = _Tracker()
    train_error: str | None = None
    for name, trainable, epochs, lr in phases_spec:
        _apply_trainable(model, trainable)
        try:
            phase = _train_phase(model, name, trainable, epochs, lr, train_data, opts, device, amp, tracker, losses,
                                 progress)
        except (RuntimeError, ValueError, IndexError) as exc:
            train_error = f"phase {name}: {type(exc).__name__}: {_first_line(exc)}"
            break
        phases.append(phase)
        if tracker.nonfinite is not None:
            break
    accuracy_after = _accuracy(model, heldout, opts.eval_batches, device, amp) if train_error is None else None
    frozen_bn = list(tracker.frozen_bn)
    bn_updated = tuple(n for n in frozen_bn if n in tracker.bn_updated)

    checks["training runs"] = Check("training runs", FAIL, train_error) if train_error else Check(
        "training runs", PASS, f"{len(losses)} steps in {len(phases)} phase(s)")
    checks["loss finite"] = _finite_check(tracker, losses)
    checks["overfit one batch"] = _overfit_check(overfit)
    checks.update(_param_checks(tracker, bool(phases)))
    checks["frozen BatchNorm stats"] = _bn_check(frozen_bn, bn_updated, opts.freeze_bn)
    epoch_means = [m for p in phases for m in p.epoch_losses]
    checks["epoch loss"] = Check("epoch loss", INFO, (
        f"first {epoch_means[0]:.4f} -> last {epoch_means[-1]:.4f} over {len(epoch_means)} epoch(s)"
        if epoch_means else "no epoch completed"))
    checks["held-out accuracy"] = Check("held-out accuracy", INFO, f"{_pct(accuracy_before)} -> {_pct(accuracy_after)}")
    throughput = _throughput(phases)
    checks["throughput"] = Check("throughput", INFO, f"{throughput:.1f} images/s" if throughput else "-")

    saved = _save(model, opts.save, opts.force, path) if opts.save and train_error is None else None
    plot = _plot(losses, phases, opts.plot) if opts.plot else None
    return _finish(base, checks, opts, rss=_peak_rss(), cuda=_peak_cuda(device), phases=tuple(phases),
                   losses=tuple(losses), overfit_losses=tuple(overfit), accuracy_before=accuracy_before,
                   accuracy_after=accuracy_after, images_per_s=throughput, frozen_bn=tuple(frozen_bn),
                   frozen_bn_updated=bn_updated, saved=saved, plot=plot, num_classes=out_classes)


def _finish(base: dict[str, Any], checks: dict[str, Check], opts: FinetuneOptions, *, rss: int, cuda: int | None,
            **rest: Any) -> FinetuneReport:
    for name in CHECK_NAMES:
        checks.setdefault(name, Check(name, SKIP, "not reached"))
    checks["peak memory"] = Check("peak memory", INFO, f"RSS {human_bytes(rss)}" + (
        f", CUDA {human_bytes(cuda)} allocated" if cuda is not None else ""))
    values: dict[str, Any] = dict(phases=(), losses=(), overfit_losses=(), accuracy_before=None, accuracy_after=None,
                  images_per_s=None, frozen_bn=(), frozen_bn_updated=(), num_classes=None)
    values.update(rest)
    return FinetuneReport(**base, **values, checks=tuple(checks[n] for n in CHECK_NAMES), peak_rss_bytes=rss,
                          peak_cuda_bytes=cuda)

