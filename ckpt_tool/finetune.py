"""``finetune-check``: load a checkpoint into a model, freeze, train briefly, and check it all -> FinetuneReport.

Before a team spends a GPU-day fine-tuning, this answers in a minute: do the weights load, does
the model run, does training move only what should move, and does the loss go down?

torch is imported inside the functions that need it: importing this module stays cheap.
"""

from __future__ import annotations

import fnmatch
import functools
import importlib.util
import math
import os
import re
import resource
import statistics
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, fields
from typing import Any

from .arch import build_model
from .errors import InputError, OutputError, UsageError
from .model import Checkpoint, common_prefix, contiguous_strides, in_module
from .reader import open_checkpoint
from .render import human_bytes, shape_str
from .values import torch_state_dict

PASS, FAIL, INFO, SKIP = "pass", "fail", "info", "skip"
# where the families keep their classification head, most specific first
HEAD_NAMES = ("fc", "classifier", "heads", "head")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
OVERFIT_MARGIN = 0.7  # the fixed batch's last loss must fall below 70% of its first
SYNTHETIC_BATCHES = 8  # a synthetic epoch, in batches, unless ``synthetic:N`` says how many images
_RANGE = re.compile(r"^([A-Za-z_]*)(\d+)-(\d+)$")


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
    strict: bool = False
    num_classes: int | None = None
    head: str | None = None
    freeze: tuple[str, ...] = ()
    trainable: tuple[str, ...] = ()
    freeze_first: int | None = None
    freeze_epochs: int = 0
    unfreeze_lr: float | None = None
    freeze_bn: bool = False
    data: str = "synthetic"
    image_size: int | None = None
    epochs: int = 1
    max_steps: int | None = None
    batch_size: int = 16
    lr: float = 1e-3
    optimizer: str = "adam"
    device: str = "auto"
    amp: bool = False
    seed: int = 0
    overfit_steps: int = 10
    eval_batches: int = 2
    plot: str | None = None
    save: str | None = None
    force: bool = False


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
        >>> options = FinetuneOptions(num_classes=4, image_size=16, max_steps=2, lr=0.03, overfit_steps=30)
        >>> report = finetune_check("tiny_cnn_10.pth", "my_models.py:tiny_cnn", options)
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


CHECK_NAMES = (
    "weights loaded", "forward pass", "training runs", "loss finite", "overfit one batch", "frozen unchanged",
    "trainable changed", "gradients", "frozen BatchNorm stats", "epoch loss", "held-out accuracy", "throughput",
    "peak memory",
)


def _validate(opts: FinetuneOptions) -> None:
    positive = {"--epochs": opts.epochs, "--batch-size": opts.batch_size, "--overfit-steps": opts.overfit_steps,
                "--eval-batches": opts.eval_batches}
    for name, value in positive.items():
        if value < 1:
            raise UsageError(f"{name} must be at least 1, got {value}")
    for name, opt in (("--max-steps", opts.max_steps), ("--num-classes", opts.num_classes),
                      ("--freeze-first", opts.freeze_first), ("--image-size", opts.image_size)):
        if opt is not None and opt < 1:
            raise UsageError(f"{name} must be at least 1, got {opt}")
    if not (opts.lr > 0 and math.isfinite(opts.lr)):
        raise UsageError(f"--lr must be a positive number, got {opts.lr}")
    if opts.optimizer not in ("adam", "sgd"):
        raise UsageError(f"--optimizer must be adam or sgd, got {opts.optimizer!r}")
    if opts.freeze_epochs < 0:
        raise UsageError(f"--freeze-epochs must be 0 or more, got {opts.freeze_epochs}")
    if opts.freeze_epochs and opts.freeze_epochs >= opts.epochs:
        raise UsageError(f"--freeze-epochs {opts.freeze_epochs} leaves no epoch to train unfrozen "
                         f"(--epochs {opts.epochs} counts both phases)", hint=f"pass --epochs {opts.freeze_epochs + 1}")
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


# ---- loading -------------------------------------------------------------------------------------------------------


def _migrated_state(ckpt: Checkpoint, opts: FinetuneOptions, model: Any) -> tuple[dict[str, Any], tuple[str, ...],
                                                                           tuple[str, ...]]:
    """The checkpoint's tensors after the migrate operations (a --plan file first, then the inline ones).

    Returns the state, the operations' descriptions, and the keys the plan leaves to the model's
    own initialisation (fill_missing, reinit_mismatched).
    """
    import torch

    from . import plan as plan_mod
    from .arch import signature_of

    ops = list(plan_mod.load_plan(opts.plan).operations) if opts.plan else []
    ops += [plan_mod.operation("strip_prefix", prefix=p) for p in opts.strip_prefix]
    ops += [plan_mod.operation("add_prefix", prefix=p) for p in opts.add_prefix]
    ops += [plan_mod.parse_rename(r) for r in opts.rename]
    ops += [plan_mod.operation("drop", prefix=p) for p in opts.drop]
    state = plan_mod.initial_state(ckpt.tensors)
    if ops:
        state = plan_mod.apply(ops, state, signature_of(model)[0]).state
    refs = {k: e.ref for k, e in state.items() if e.source == plan_mod.CHECKPOINT and e.ref is not None}
    tensors = torch_state_dict(refs)
    for key, entry in state.items():
        if key in tensors and entry.dtype != entry.source_dtype:
            tensors[key] = tensors[key].to(getattr(torch, entry.dtype))
    initialised = tuple(k for k in state if k not in refs)
    return tensors, tuple(op.describe() for op in ops), initialised


def _load_into(model: Any, state: dict[str, Any], heads: tuple[str, ...], operations: tuple[str, ...],
               initialised: tuple[str, ...] = ()) -> LoadReport:
    model_state = model.state_dict()
    missing = [k for k in model_state if k not in state and k not in initialised]
    unexpected = [k for k in state if k not in model_state]
    mismatched = [Mismatch(k, tuple(v.shape), tuple(model_state[k].shape)) for k, v in state.items()
                  if k in model_state and tuple(v.shape) != tuple(model_state[k].shape)]
    bad = {m.key for m in mismatched}
    usable = {k: v for k, v in state.items() if k in model_state and k not in bad}
    # filtered first, so torch reports nothing we have not already counted and raises no size mismatch
    model.load_state_dict(usable, strict=False)
    head_keys = tuple(k for k in model_state if any(in_module(k, h) for h in heads))
    return LoadReport(loaded=len(usable), model_keys=len(model_state), checkpoint_keys=len(state),
                      missing=tuple(missing), unexpected=tuple(unexpected), mismatched=tuple(mismatched),
                      head_keys=head_keys, operations=operations, initialised=initialised)


def _load_check(load: LoadReport, strict: bool, ckpt: Checkpoint) -> Check:
    head = set(load.head_keys)
    missing = [k for k in load.missing if k not in head]
    mismatched = [m for m in load.mismatched if m.key not in head]
    # buffers such as num_batches_tracked are often absent from older checkpoints; they do not hold weights
    weight_missing = [k for k in missing if not k.endswith("num_batches_tracked")]
    summary = (f"{load.loaded}/{load.model_keys} model tensors loaded; {len(load.missing)} missing, "
               f"{len(load.unexpected)} unexpected, {len(load.mismatched)} mismatched")
    if head:
        layers = dict.fromkeys(k.rsplit(".", 1)[0] for k in load.head_keys)
        summary += f" (head {', '.join(layers)} replaced)"
    if load.initialised:
        summary += f"; {len(load.initialised)} left to the model's initialisation by the plan"
    problems: list[str] = []
    if weight_missing:
        problems.append("missing " + _some(weight_missing))
    if mismatched:
        problems.append("mismatched " + _some([f"{m.key} {shape_str(m.checkpoint_shape)} vs "
                                               f"{shape_str(m.model_shape)}" for m in mismatched]))
    if strict and (missing or load.unexpected):
        problems.append("--strict: " + _some(missing + list(load.unexpected)))
    if load.loaded == 0 and load.model_keys:
        prefix = common_prefix(list(ckpt.tensors))
        hint = f"; try --strip-prefix {prefix}" if prefix else ""
        return Check("weights loaded", FAIL, f"nothing loaded: {summary}{hint}")
    if problems:
        return Check("weights loaded", FAIL, f"{summary}; " + "; ".join(problems))
    if load.unexpected:
        summary += f"; ignored {_some(list(load.unexpected))}"
    return Check("weights loaded", PASS, summary)


# ---- head ----------------------------------------------------------------------------------------------------------


def find_head(model: Any, name: str | None) -> str:
    """The dotted path of the final layer of the classification head ("fc", "classifier.6", "heads.head")."""
    from torch import nn

    if name is not None:
        try:
            module = model.get_submodule(name)
        except AttributeError:
            raise UsageError(f"--head {name}: the model has no such module (top-level: "
                             f"{', '.join(n for n, _ in model.named_children())})") from None
        root = name
    else:
        children = dict(model.named_children())
        root = next((n for n in HEAD_NAMES if n in children), "")
        if not root:
            return ""
        module = children[root]
    layers = [n for n, m in module.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
    if not layers:
        raise UsageError(f"--head {root}: holds no Linear or Conv2d layer to replace")
    return ".".join(p for p in (root, layers[-1]) if p)


def replace_head(model: Any, num_classes: int, name: str | None = None) -> HeadChange:
    """Swap the head's final Linear/Conv2d for a fresh one with ``num_classes`` outputs (in place).

    Example:
        >>> import torchvision
        >>> replace_head(torchvision.models.mobilenet_v3_small(weights=None), 10).module
        'classifier.3'
    """
    from torch import nn

    path = find_head(model, name)
    if not path:
        raise UsageError(f"--num-classes: no classification head found (looked for {', '.join(HEAD_NAMES)})",
                         hint="name it with --head MODULE")
    old, new = _swap_layer(model, path, num_classes)
    # GoogLeNet / Inception auxiliary classifiers (aux1, aux2, AuxLogits) train beside the main head
    aux = []
    for child, module in model.named_children():
        layers = [n for n, m in module.named_modules() if isinstance(m, nn.Linear)]
        if child.lower().startswith("aux") and layers:
            aux.append(f"{child}.{layers[-1]}" if layers[-1] else child)
            _swap_layer(model, aux[-1], num_classes)
    return HeadChange(path, _layer_text(old), _layer_text(new), tuple(aux))


def _swap_layer(model: Any, path: str, num_classes: int) -> tuple[Any, Any]:
    from torch import nn

    old = model.get_submodule(path)
    if isinstance(old, nn.Linear):
        new: Any = nn.Linear(old.in_features, num_classes, bias=old.bias is not None)
    else:
        new = nn.Conv2d(old.in_channels, num_classes, old.kernel_size, old.stride, old.padding,
                        bias=old.bias is not None)
    parent_path, _, attr = path.rpartition(".")
    setattr(model.get_submodule(parent_path) if parent_path else model, attr, new)
    return old, new


def _layer_text(layer: Any) -> str:
    return f"{type(layer).__name__}({layer.extra_repr()})"


# ---- freezing ------------------------------------------------------------------------------------------------------


def expand_pattern(pattern: str) -> list[str]:
    """``features.0-3`` -> ``[features.0, ..., features.3]``; ``layer1-2`` -> ``[layer1, layer2]``; others unchanged."""
    parts = pattern.split(".")
    for i, part in enumerate(parts):
        m = _RANGE.match(part)
        if m and not pattern.startswith("re:"):
            lo, hi = int(m.group(2)), int(m.group(3))
            if lo > hi:
                raise UsageError(f"{pattern!r}: range {part} runs backwards")
            return [".".join(parts[:i] + [f"{m.group(1)}{n}"] + parts[i + 1:]) for n in range(lo, hi + 1)]
    return [pattern]


def matches(name: str, pattern: str) -> bool:
    """Does parameter ``name`` fall under ``pattern``: a module path, a glob, or ``re:REGEX``?

    Example:
        >>> matches("features.3.weight", "features.3"), matches("layer4.0.conv1.weight", "layer4.*")
        (True, True)
    """
    if pattern.startswith("re:"):
        return re.search(pattern[3:], name) is not None
    if in_module(name, pattern):
        return True
    return any(c in pattern for c in "*?[") and (fnmatch.fnmatchcase(name, pattern)
                                                  or fnmatch.fnmatchcase(name, pattern + ".*"))


def select_trainable(model: Any, freeze: Iterable[str] = (), trainable: Iterable[str] = (),
                     freeze_first: int | None = None) -> frozenset[str]:
    """The names of the parameters left trainable by the freezing options."""
    names = [n for n, _ in model.named_parameters()]
    freeze = list(freeze) + _first_layers(model, freeze_first)
    selected = set(names)
    if trainable:
        selected = set()
        for pattern in trainable:
            selected |= _select(names, pattern, "--trainable", model)
    for pattern in freeze:
        selected -= _select(names, pattern, "--freeze", model)
    return frozenset(selected)


def _select(names: list[str], pattern: str, option: str, model: Any) -> set[str]:
    if pattern.startswith("re:"):
        try:
            re.compile(pattern[3:])
        except re.error as exc:
            raise UsageError(f"{option} {pattern!r}: bad regular expression ({exc})") from None
    hits = {n for p in expand_pattern(pattern) for n in names if matches(n, p)}
    if not hits:
        top = ", ".join(n for n, _ in model.named_children())
        raise UsageError(f"{option} {pattern!r} matches no parameter (top-level modules: {top})")
    return hits


def _first_layers(model: Any, n: int | None) -> list[str]:
    if not n:
        return []
    # "the first N layers of features": the first top-level block when the model has one
    children = dict(model.named_children())
    block_name = "features" if "features" in children else ""
    block = children.get("features", model)
    layers = [f"{block_name}.{name}" if block_name else name for name, _ in block.named_children()]
    if n > len(layers):
        raise UsageError(f"--freeze-first {n}: {block_name or 'the model'} has only {len(layers)} layers")
    with_params = [p for p in layers[:n] if any(True for _ in model.get_submodule(p).parameters())]
    return with_params


def _phase_plan(model: Any, opts: FinetuneOptions, heads: tuple[str, ...]) -> list[tuple[str, frozenset[str], int, float]]:
    chosen = select_trainable(model, opts.freeze, opts.trainable, opts.freeze_first)
    if not opts.freeze_epochs:
        return [("train", chosen, opts.epochs, opts.lr)]
    everything = frozenset(n for n, _ in model.named_parameters())
    if chosen == everything:  # no freezing given: the schedule's first phase trains the head alone
        if not heads[0]:
            raise UsageError("--freeze-epochs: no head found to train alone", hint="name it with --head or --trainable")
        chosen = select_trainable(model, trainable=[h.rpartition(".")[0] or h for h in heads])
    unfreeze_lr = opts.unfreeze_lr if opts.unfreeze_lr is not None else opts.lr / 10
    return [("frozen", chosen, opts.freeze_epochs, opts.lr),
            ("unfrozen", everything, opts.epochs - opts.freeze_epochs, unfreeze_lr)]


def _apply_trainable(model: Any, trainable: frozenset[str]) -> None:
    if not trainable:
        raise UsageError("every parameter is frozen: nothing would train")
    for name, p in model.named_parameters():
        p.requires_grad_(name in trainable)


def _param_table(model: Any) -> tuple[ModuleParams, ...]:
    rows: dict[str, list[int]] = {}
    for name, p in model.named_parameters():
        row = rows.setdefault(name.split(".", 1)[0], [0, 0])
        row[0 if p.requires_grad else 1] += p.numel()
    return tuple(ModuleParams(m, t, f) for m, (t, f) in rows.items())


# ---- forward probe -------------------------------------------------------------------------------------------------


def _probe_forward(model: Any, x: Any) -> tuple[str | None, int]:
    """Run one batch with hooks; on failure, name the module that ran last and the one that failed."""
    import torch

    entered: list[tuple[str, Any, tuple[Any, ...]]] = []
    done: list[tuple[str, Any]] = []

    def pre(name: str) -> Any:
        def hook(module: Any, args: tuple[Any, ...]) -> None:
            entered.append((name, module, tuple(_shape(a) for a in args)))
        return hook

    def post(name: str) -> Any:
        def hook(module: Any, args: Any, output: Any) -> None:
            entered.pop()
            done.append((name, _shape(output)))
        return hook

    handles = []
    for name, module in model.named_modules():
        if name:
            handles.append(module.register_forward_pre_hook(pre(name)))
            handles.append(module.register_forward_hook(post(name)))
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            out = _logits(model(x))
    except Exception as exc:  # noqa: BLE001 - user models fail in every way; we describe it
        return _describe_failure(entered, done, exc), 0
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    if not isinstance(out, torch.Tensor) or out.dim() != 2:
        return f"the model returned {_shape(out) or type(out).__name__}, not [batch, classes] logits", 0
    return None, int(out.shape[1])


def _describe_failure(entered: list[tuple[str, Any, tuple[Any, ...]]], done: list[tuple[str, Any]],
                      exc: Exception) -> str:
    error = f"{type(exc).__name__}: {_first_line(exc)}"
    if not entered:
        return f"forward failed outside any submodule: {error}"
    name, module, inputs = entered[-1]
    got = inputs[0] if inputs else None
    want = _expected_input(module)
    ancestors = {".".join(name.split(".")[:i]) for i in range(1, name.count(".") + 1)}
    before = next(((n, s) for n, s in reversed(done) if n not in ancestors and not in_module(n, name)), None)
    source = f"{before[0]} outputs {shape_str(before[1])}" if before else "the input"
    layer = f"{name} ({type(module).__name__})"
    if want:
        return f"{source}, but {layer} expects {want} and receives {shape_str(got)} ({error})"
    return f"{source}; {layer} fails on its input {shape_str(got)} ({error})"


def _expected_input(module: Any) -> str | None:
    from torch import nn

    if isinstance(module, nn.Linear):
        return f"{module.in_features} input features"
    if isinstance(module, nn.modules.conv._ConvNd):
        return f"{module.in_channels} input channels"
    if isinstance(module, nn.modules.batchnorm._BatchNorm):
        return f"{module.num_features} channels"
    if isinstance(module, nn.LayerNorm):
        return f"last dimensions {list(module.normalized_shape)}"
    return None


def _shape(value: Any) -> tuple[int, ...] | None:
    shape = getattr(value, "shape", None)
    if shape is not None:
        return tuple(int(d) for d in shape)
    if isinstance(value, (tuple, list)) and value:
        return _shape(value[0])
    return None


AUX_WEIGHT = 0.3  # GoogLeNet's weight for its auxiliary classifiers' losses


def _loss(out: Any, labels: Any) -> Any:
    """Cross-entropy of the logits, plus the auxiliary classifiers' (GoogLeNet, Inception) when the model returns them."""
    import torch
    import torch.nn.functional as F

    loss = F.cross_entropy(_logits(out), labels)
    if isinstance(out, tuple) and not isinstance(out, torch.Tensor):
        for aux in out[1:]:
            if isinstance(aux, torch.Tensor) and aux.dim() == 2:
                loss = loss + AUX_WEIGHT * F.cross_entropy(aux, labels)
    return loss


def _logits(out: Any) -> Any:
    """Classification logits from what models return: a tensor, (logits, aux...) or an object with ``logits``."""
    if isinstance(out, dict) and "logits" in out:
        return out["logits"]
    if hasattr(out, "logits"):
        return out.logits
    if isinstance(out, (tuple, list)) and out:
        return out[0]
    return out


# ---- data ----------------------------------------------------------------------------------------------------------


def _input_spec(arch: str, image_size: int | None) -> tuple[int, tuple[float, ...], tuple[float, ...]]:
    """Image size and normalisation: the architecture's default weights' transforms when torchvision knows it."""
    size, mean, std = 224, IMAGENET_MEAN, IMAGENET_STD
    if ":" not in arch:
        try:
            import torchvision

            preset = torchvision.models.get_model_weights(arch).DEFAULT.transforms()
            size, mean, std = int(preset.crop_size[0]), tuple(preset.mean), tuple(preset.std)
        except Exception:  # noqa: BLE001 - models without weight enums keep the ImageNet defaults
            pass
    return image_size or size, mean, std


def _input_channels(model: Any) -> int:
    from torch import nn

    first = next((m for m in model.modules() if isinstance(m, nn.modules.conv._ConvNd)), None)
    return int(first.in_channels) if first is not None else 3


class _Synthetic:
    """Deterministic batches: a low-resolution prototype per class plus noise, so the labels are learnable."""

    def __init__(self, images: int, batch: int, size: int, channels: int, classes: int, seed: int) -> None:
        import torch

        self.images, self.batch, self.size, self.seed = images, batch, size, seed
        gen = torch.Generator().manual_seed(seed)
        self.prototypes = torch.randn(classes, channels, 8, 8, generator=gen)
        self.classes = classes

    def __len__(self) -> int:
        return -(-self.images // self.batch)

    def __iter__(self) -> Any:
        import torch
        import torch.nn.functional as F

        for i in range(len(self)):
            n = min(self.batch, self.images - i * self.batch)
            gen = torch.Generator().manual_seed(self.seed * 1_000_003 + i)
            labels = torch.randint(0, self.classes, (n,), generator=gen)
            signal = F.interpolate(self.prototypes[labels], size=(self.size, self.size), mode="nearest")
            yield signal + torch.randn(signal.shape, generator=gen), labels


def _make_data(opts: FinetuneOptions, size: int, channels: int, classes: int, mean: tuple[float, ...],
               std: tuple[float, ...]) -> tuple[Any, Any, int]:
    kind, _, arg = opts.data.partition(":")
    if kind == "synthetic":
        try:
            images = int(arg) if arg else opts.batch_size * SYNTHETIC_BATCHES
        except ValueError:
            raise UsageError(f"--data {opts.data}: synthetic:N takes a number of images") from None
        if images < 1:
            raise UsageError(f"--data {opts.data}: needs at least 1 image")
        heldout_images = opts.batch_size * opts.eval_batches
        return (_Synthetic(images, opts.batch_size, size, channels, classes, opts.seed),
                _Synthetic(heldout_images, opts.batch_size, size, channels, classes, opts.seed + 1), 0)
    if kind not in ("imagefolder", "cifar10") or not arg:
        raise UsageError(f"--data {opts.data!r}: expected synthetic, synthetic:N, imagefolder:DIR or cifar10:DIR")
    import torch
    from torchvision import transforms

    steps = [transforms.Resize((size, size))]
    if channels == 1:
        steps.append(transforms.Grayscale())
    steps += [transforms.ToTensor(), transforms.Normalize(mean[:channels] if channels < 3 else mean,
                                                          std[:channels] if channels < 3 else std)]
    transform = transforms.Compose(steps)
    if kind == "imagefolder":
        train, heldout, n_classes = _imagefolder(arg, transform, opts.seed)
    else:
        train, heldout, n_classes = _cifar10(arg, transform)
    gen = torch.Generator().manual_seed(opts.seed)
    loader = torch.utils.data.DataLoader(train, batch_size=opts.batch_size, shuffle=True, generator=gen)
    held = torch.utils.data.DataLoader(heldout, batch_size=opts.batch_size)
    return loader, held, n_classes


def _imagefolder(root: str, transform: Any, seed: int) -> tuple[Any, Any, int]:
    import torch
    from torchvision import datasets

    if not os.path.isdir(root):
        raise InputError(f"--data imagefolder:{root}: no such directory")
    try:
        full = datasets.ImageFolder(root, transform=transform)
    except (FileNotFoundError, RuntimeError) as exc:
        raise InputError(f"--data imagefolder:{root}: {_first_line(exc)}",
                         hint="it needs one sub-directory of images per class") from None
    if len(full) < 2:
        raise InputError(f"--data imagefolder:{root}: {len(full)} image(s); at least 2 are needed to hold one out")
    order = torch.randperm(len(full), generator=torch.Generator().manual_seed(seed)).tolist()
    held = max(1, len(full) // 5)
    return (torch.utils.data.Subset(full, order[held:]), torch.utils.data.Subset(full, order[:held]),
            len(full.classes))


def _cifar10(root: str, transform: Any) -> tuple[Any, Any, int]:
    from torchvision import datasets

    try:
        train = datasets.CIFAR10(root, train=True, transform=transform, download=False)
        test = datasets.CIFAR10(root, train=False, transform=transform, download=False)
    except (RuntimeError, OSError):
        raise InputError(f"--data cifar10:{root}: CIFAR-10 not found there",
                         hint="it needs cifar-10-batches-py/ from https://www.cs.toronto.edu/~kriz/cifar.html;"
                              " ckpt never downloads") from None
    return train, test, 10


# ---- training ------------------------------------------------------------------------------------------------------


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


# ---- checks --------------------------------------------------------------------------------------------------------


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


# ---- outputs -------------------------------------------------------------------------------------------------------


def _save(model: Any, out: str, force: bool, source: str) -> str:
    """The fine-tuned state dict as safetensors, through migrate's atomic writer."""
    from .writer import Blob, Layout, View, write_checkpoint

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


def _plot(losses: list[float], phases: list[Phase], out: str) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(range(1, len(losses) + 1), losses, label="training loss")
    edge = 0
    for phase in phases[:-1]:
        edge += phase.steps
        ax.axvline(edge + 0.5, color="grey", linestyle="--", label=f"end of {phase.name}")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.legend()
    try:
        fig.savefig(out, dpi=100)
    except OSError as exc:
        raise OutputError(f"{out}: cannot be written ({exc.strerror or exc})") from None
    finally:
        plt.close(fig)
    return out


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


def _some(items: list[str], limit: int = 4) -> str:
    more = f" (+{len(items) - limit} more)" if len(items) > limit else ""
    return ", ".join(items[:limit]) + more


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{value:.1%}"
