"""``finetune_check``: build, load, freeze, probe, train and check, in that order."""

from __future__ import annotations

from typing import Any

from ..arch import HF_PREFIX, build_model
from ..errors import UsageError
from ..reader import open_checkpoint
from ..text import human_bytes, shape_str
from ..torch_extra import require_torch
from .checks import (
    bn_check,
    distributed_checks,
    finite_check,
    overfit_verdict,
    param_checks,
    peak_cuda,
    peak_rss,
    throughput,
)
from .data import _input_channels, _input_spec, make_datasets, make_loaders, training_size
from .distributed import Ranks, device_for, from_environment, wrap
from .freeze import apply_trainable, model_frozen, param_table, phase_plan
from .head import find_head, head_outputs, replace_head
from .load import _load_check, _load_into, _migrated_state
from .options import FinetuneOptions, _pick_device, _validate
from .output import _plot, _save
from .probe import _probe_forward
from .report import (
    CHECK_NAMES,
    DISTRIBUTED_CHECKS,
    FAIL,
    INFO,
    PASS,
    SKIP,
    Check,
    Epoch,
    FinetuneReport,
    OnSetup,
    Phase,
    Setup,
    TrainingProgress,
    _first_line,
    _pct,
)
from .resume import read_resume, resume_check
from .train import (
    BnSource,
    Tracker,
    autocast,
    evaluate,
    kept_batchnorms,
    overfit_lrs,
    overfit_one_batch,
    reestimated_batchnorms,
    train_phase,
)


def _bn_note(model: Any, bn: BnSource | None, opts: FinetuneOptions) -> str:
    """How the held-out figures treated BatchNorm statistics, when the model has any to treat."""
    layers = reestimated_batchnorms(model, bn, kept_batchnorms(model, opts))
    if not layers or bn is None:
        return ""
    return (
        f"; BatchNorm statistics re-estimated on {bn.images} training images for these (--eval-bn running: as trained)"
    )


def finetune_check(
    path: str,
    arch: str,
    options: FinetuneOptions | None = None,
    progress: TrainingProgress | None = None,
    on_setup: OnSetup | None = None,
) -> FinetuneReport:
    """Load ``path`` into ``arch``, fine-tune it briefly and check every step of the way.

    Under ``torchrun`` (``WORLD_SIZE`` > 1 in the environment) every process runs this, the model
    is wrapped in DistributedDataParallel, the data is sharded, and the report (the same on every
    rank for the cross-rank checks) is rank 0's to print.

    Args:
        path: a checkpoint of any format ``open_checkpoint`` reads.
        arch: a target as ``--arch`` takes it (``"resnet18"``, ``"pkg.mod:factory"``, ``"file.py:factory"``).
        options: see :class:`FinetuneOptions`.
        progress: called after every training step (the CLI draws its progress bar with it).
        on_setup: called once the load and freeze tables are known, before the forward probe and training.

    Returns:
        A :class:`FinetuneReport`; failed checks are findings, not exceptions. Bad input raises
        a :class:`CkptError`.

    Example:
        >>> options = FinetuneOptions(num_classes=4, image_size=16, max_steps=2, lr=0.03, overfit_steps=30)
        >>> report = finetune_check("tiny_cnn_10.pth", "my_models.py:tiny_cnn", options)
        >>> report.passed
        True
    """
    if arch.startswith(HF_PREFIX):
        raise UsageError(
            f"--arch {arch}: finetune-check trains image classifiers on images; a transformers model "
            "is not one (use diff, migrate or validate with hf: targets)"
        )
    require_torch("finetune-check", torchvision=True)
    opts = options or FinetuneOptions()
    _validate(opts)
    device = _pick_device(opts.device, opts.amp)
    ranks = from_environment(opts.device)
    try:
        return _run(path, arch, opts, device_for(ranks, device), ranks, progress, on_setup)
    finally:
        ranks.close()


def _run(
    path: str,
    arch: str,
    opts: FinetuneOptions,
    device: Any,
    ranks: Ranks,
    progress: TrainingProgress | None,
    on_setup: OnSetup | None,
) -> FinetuneReport:
    import torch

    ckpt = open_checkpoint(path, opts.key)
    torch.manual_seed(opts.seed)
    model = build_model(arch, opts.arch_args, device="cpu")
    # read before the head is replaced: a Trainer's optimizer ids follow the trained model's groups
    resume = read_resume(ckpt, opts.optimizer, path=path, model=model) if opts.resume_optimizer else None
    # --head alone only names the head (for --freeze-epochs); --num-classes replaces it
    head = replace_head(model, opts.num_classes, opts.head) if opts.num_classes else None
    head_path = head.module if head else find_head(model, opts.head)
    by_model = model_frozen(model)  # the factory's own freezing, read before anything sets a flag
    state, operations, initialised = _migrated_state(ckpt, opts, model)
    load = _load_into(model, state, (head.module, *head.aux) if head else (), operations, initialised)
    del state
    model.to(device)
    specs = phase_plan(model, opts, (head_path, *head.aux) if head else (head_path,), by_model)
    apply_trainable(model, specs[0].trainable)
    params = param_table(model, by_model)
    forward_size, mean, std = _input_spec(arch, opts.image_size)
    channels = _input_channels(model)
    size = training_size(model, opts, device, forward_size, channels)
    shown = dict(forward_size=forward_size if forward_size != size else None)
    setup = Setup(
        path,
        arch,
        str(device),
        opts.data,
        size,
        load,
        head,
        params,
        ranks.world,
        opts.num_classes or head_outputs(model, head_path),
        **shown,
    )
    if on_setup is not None:
        on_setup(setup)
    base = dict(
        checkpoint=path,
        arch=arch,
        device=str(device),
        data=opts.data,
        image_size=size,
        load=load,
        head=head,
        params=params,
        world_size=ranks.world,
        **shown,
    )

    checks: dict[str, Check] = {}
    checks["weights loaded"] = _load_check(load, opts.strict, ckpt)
    probe = torch.randn(2, channels, forward_size, forward_size, generator=torch.Generator().manual_seed(opts.seed))
    forward_error, out_classes = _probe_forward(model, probe.to(device))
    if forward_error is not None:
        checks["forward pass"] = Check("forward pass", FAIL, forward_error)
        return _finish(base, checks, ranks, rss=peak_rss(), cuda=peak_cuda(device), num_classes=out_classes or None)
    checks["forward pass"] = Check("forward pass", PASS, f"{shape_str(probe.shape)} -> [2, {out_classes}]")
    data = make_datasets(opts, size, channels, out_classes, mean, std)
    if data.classes > out_classes:
        raise UsageError(
            f"--data {opts.data} has {data.classes} classes but the model outputs {out_classes} logits",
            hint=f"pass --num-classes {data.classes}",
        )
    train_data, heldout = make_loaders(
        data,
        opts.batch_size,
        opts.seed,
        shuffle=not opts.data.startswith("synthetic"),
        rank=ranks.rank,
        world=ranks.world,
    )
    if not specs[0].trainable:
        why = "every parameter is frozen: nothing can learn" + (
            ""
            if opts.train_frozen or not by_model
            else f" ({len(by_model)} tensors frozen by the model itself; --train-frozen trains them)"
        )
        checks["training runs"] = Check("training runs", FAIL, why)
        checks["overfit one batch"] = Check("overfit one batch", FAIL, why)
        return _finish(base, checks, ranks, rss=peak_rss(), cuda=peak_cuda(device), num_classes=out_classes)

    amp = autocast(device, opts.amp)
    bn = BnSource.from_options(data.train, opts)
    loss_before, accuracy_before = evaluate(
        model, heldout, opts.eval_batches, device, amp, ranks, bn, kept_batchnorms(model, opts)
    )
    epochs = [Epoch("before", 0, specs[0].lr, 0, None, loss_before, accuracy_before, None)]
    net = wrap(model, ranks, device)
    overfit = overfit_one_batch(
        model,
        next(iter(train_data)),
        opts.overfit_steps,
        opts.optimizer,
        overfit_lrs(specs[0].lr, given=opts.lr is not None),
        device,
        amp,
        net=net,
        agree=lambda flag: ranks.any(flag, device),
    )

    steps_per_epoch = min(len(train_data), opts.max_steps) if opts.max_steps else len(train_data)
    tracker = Tracker(total_steps=sum(s.epochs for s in specs) * steps_per_epoch)
    total_epochs = sum(s.epochs for s in specs)
    phases: list[Phase] = []
    losses: list[float] = []
    train_error: str | None = None
    for i, spec in enumerate(specs):
        apply_trainable(model, spec.trainable)
        if i:
            net = wrap(model, ranks, device)  # DDP reduces what was trainable when it was built
        try:
            phase, rows = train_phase(
                model,
                net,
                spec,
                train_data,
                heldout,
                opts,
                device,
                amp,
                tracker,
                losses,
                progress,
                ranks,
                epochs[-1].epoch,
                total_epochs,
                resume=resume if i == 0 else None,
                bn=bn,
            )
        except (RuntimeError, ValueError, IndexError) as exc:
            train_error = f"phase {spec.name}: {type(exc).__name__}: {_first_line(exc)}"
            break
        phases.append(phase)
        epochs += rows
        if tracker.nonfinite is not None:
            break
    last = epochs[-1]
    accuracy_after = last.heldout_accuracy if train_error is None and last.epoch else None
    frozen_bn = list(tracker.frozen_bn)
    bn_updated = tuple(n for n in frozen_bn if n in tracker.bn_updated)

    checks["training runs"] = (
        Check("training runs", FAIL, train_error)
        if train_error
        else Check(
            "training runs",
            PASS,
            f"{len(losses)} steps in {len(phases)} phase(s)"
            + (f" on each of {ranks.world} ranks" if ranks.distributed else ""),
        )
    )
    if resume is not None:
        checks["optimizer resumed"] = resume_check(resume, tracker)
    checks["loss finite"] = finite_check(tracker, losses)
    checks["overfit one batch"] = overfit_verdict(overfit, out_classes)
    checks.update(param_checks(tracker, bool(phases)))
    checks.update(distributed_checks(tracker, ranks, bool(phases)))
    checks["frozen BatchNorm stats"] = bn_check(frozen_bn, bn_updated, opts.freeze_bn)
    epoch_means = [m for p in phases for m in p.epoch_losses]
    checks["epoch loss"] = Check(
        "epoch loss",
        INFO,
        (
            f"first {epoch_means[0]:.4f} -> last {epoch_means[-1]:.4f} over {len(epoch_means)} epoch(s)"
            if epoch_means
            else "no epoch completed"
        ),
    )
    loss_after = last.heldout_loss if accuracy_after is not None else None
    checks["held-out accuracy"] = Check(
        "held-out accuracy",
        INFO,
        f"{_pct(accuracy_before)} -> {_pct(accuracy_after)}"
        + (
            f" (loss {loss_before:.4f} -> {loss_after:.4f})"
            if loss_before is not None and loss_after is not None
            else ""
        )
        + _bn_note(model, bn, opts),
    )
    images_per_s = throughput(phases, ranks, device)
    checks["throughput"] = Check(
        "throughput",
        INFO,
        (f"{images_per_s:.1f} images/s" if images_per_s else "-")
        + (f" over {ranks.world} ranks" if ranks.distributed and images_per_s else ""),
    )

    lead = ranks.rank == 0
    saved = _save(model, opts.save, opts.force, path) if opts.save and train_error is None and lead else None
    plot = _plot(losses, phases, epochs, opts.plot) if opts.plot and lead else None
    return _finish(
        base,
        checks,
        ranks,
        rss=peak_rss(),
        cuda=peak_cuda(device),
        phases=tuple(phases),
        losses=tuple(losses),
        overfit_losses=overfit.losses,
        accuracy_before=accuracy_before,
        accuracy_after=accuracy_after,
        images_per_s=images_per_s,
        frozen_bn=tuple(frozen_bn),
        frozen_bn_updated=bn_updated,
        saved=saved,
        plot=plot,
        num_classes=out_classes,
        epochs=tuple(epochs),
        overfit=overfit,
    )


def _finish(
    base: dict[str, Any], checks: dict[str, Check], ranks: Ranks, *, rss: int, cuda: int | None, **rest: Any
) -> FinetuneReport:
    names = list(CHECK_NAMES)
    if ranks.distributed:
        at = names.index("gradients") + 1
        names[at:at] = DISTRIBUTED_CHECKS
    at = names.index("peak memory")
    names[at:at] = [n for n in checks if n not in names]  # asked-for checks (--resume-optimizer), before memory
    for name in names:
        checks.setdefault(name, Check(name, SKIP, "not reached"))
    checks["peak memory"] = Check(
        "peak memory",
        INFO,
        f"RSS {human_bytes(rss)}"
        + (f", CUDA {human_bytes(cuda)} allocated" if cuda is not None else "")
        + (" (rank 0)" if ranks.distributed else ""),
    )
    values: dict[str, Any] = dict(
        phases=(),
        losses=(),
        overfit_losses=(),
        accuracy_before=None,
        accuracy_after=None,
        images_per_s=None,
        frozen_bn=(),
        frozen_bn_updated=(),
        num_classes=None,
    )
    values.update(rest)
    return FinetuneReport(
        **base, **values, checks=tuple(checks[n] for n in names), peak_rss_bytes=rss, peak_cuda_bytes=cuda
    )
