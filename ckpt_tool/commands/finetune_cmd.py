"""``ckpt finetune-check``: parse, call :func:`ckpt_tool.finetune.finetune_check`, render."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from collections.abc import Callable
from typing import Any

import click

from ..errors import EXIT_FINDINGS as EXIT_FAILED
from ..finetune.options import EVAL_BN, SCHEDULERS
from ..render import dumps, echo, human_count, json_option, paint, shape_str, table
from .options import OrderedCommand, arch_arg_option, arch_option, key_option, plan_operation_options

_RAW_ARGS = "ckpt.finetune.args"
_required_arch: Callable[[Callable[..., Any]], Callable[..., Any]] = arch_option(required=True)


class _FinetuneCommand(OrderedCommand):
    """Keeps the operations' command-line order and the raw arguments (``--nproc`` runs them again)."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        ctx.meta[_RAW_ARGS] = list(args)
        return super().parse_args(ctx, args)


@click.command("finetune-check", cls=_FinetuneCommand)
@click.argument("checkpoint", type=click.Path(dir_okay=True))
@_required_arch
@arch_arg_option
@key_option
@plan_operation_options
@click.option("--strict", is_flag=True, help="Fail on any missing or unexpected key (besides a replaced head).")
@click.option("--num-classes", type=int, default=None, help="Replace the classification head with one of N classes.")
@click.option("--head", default=None, metavar="MODULE", help="The head to replace, when it is not found by name.")
@click.option(
    "--freeze",
    multiple=True,
    metavar="PATTERN",
    help="Freeze parameters: module path, glob, range (features.0-9) or re:REGEX.",
)
@click.option("--trainable", multiple=True, metavar="PATTERN", help="Train only these; everything else is frozen.")
@click.option("--freeze-first", type=int, default=None, metavar="N", help="Freeze the first N layers of features.")
@click.option(
    "--freeze-epochs",
    type=int,
    default=0,
    metavar="K",
    help="Train with the freezing for K epochs, then unfreeze everything.",
)
@click.option("--unfreeze-lr", type=float, default=None, help="Learning rate after unfreezing (default --lr / 10).")
@click.option("--freeze-bn", is_flag=True, help="Keep frozen BatchNorm layers in eval mode (running stats fixed).")
@click.option(
    "--train-frozen",
    is_flag=True,
    help="Also train parameters the model itself was built with requires_grad=False (kept frozen by default).",
)
@click.option(
    "--data",
    default="synthetic",
    show_default=True,
    help="synthetic, synthetic:N, imagefolder:DIR or cifar10:DIR (never downloads).",
)
@click.option("--image-size", type=int, default=None, help="Input size (default: the architecture's, usually 224).")
@click.option("--epochs", type=int, default=1, show_default=True)
@click.option("--max-steps", type=int, default=None, help="At most N steps per epoch.")
@click.option("--batch-size", type=int, default=16, show_default=True)
@click.option(
    "--lr",
    type=float,
    default=None,
    help="Learning rate (default 1e-3; without --lr the overfit check lowers it when the loss diverges).",
)
@click.option("--optimizer", type=click.Choice(["adam", "sgd"]), default="adam", show_default=True)
@click.option(
    "--scheduler",
    type=click.Choice(SCHEDULERS),
    default="none",
    show_default=True,
    help="Learning-rate schedule, a fresh one per phase, stepped after each epoch (plateau: on the held-out loss).",
)
@click.option(
    "--plateau-patience",
    type=int,
    default=0,
    show_default=True,
    help="plateau: epochs without a better held-out loss before the rate drops.",
)
@click.option("--plateau-factor", type=float, default=0.1, show_default=True, help="plateau: the rate's multiplier.")
@click.option("--step-size", type=int, default=1, show_default=True, help="step: epochs between drops.")
@click.option("--step-gamma", type=float, default=0.1, show_default=True, help="step: the rate's multiplier.")
@click.option("--device", default="auto", show_default=True, help="auto, cpu or cuda.")
@click.option("--amp", is_flag=True, help="Mixed precision (CUDA only).")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--overfit-steps", type=int, default=20, show_default=True, help="Steps of the overfit-one-batch check.")
@click.option("--eval-batches", type=int, default=2, show_default=True, help="Held-out batches for accuracy.")
@click.option(
    "--eval-bn",
    type=click.Choice(EVAL_BN),
    default="reestimate",
    show_default=True,
    help="BatchNorm statistics for held-out evaluation: re-estimated on --eval-batches training "
    "batches (a short run leaves the running averages stale), or the running averages as trained.",
)
@click.option(
    "--plot",
    default=None,
    metavar="FILE.png",
    help="Draw loss per step, held-out loss and accuracy per "
    "epoch and the learning rate (needs matplotlib: the plot extra).",
)
@click.option("--save", default=None, metavar="OUT.safetensors", help="Write the fine-tuned weights.")
@click.option("--force", is_flag=True, help="Overwrite --save's file.")
@click.option(
    "--resume-optimizer",
    is_flag=True,
    help="Start from the optimizer state beside the state dict "
    "(as ckpt migrate carries it): each parameter with saved state resumes it; the others start fresh.",
)
@click.option(
    "--nproc",
    type=int,
    default=None,
    metavar="N",
    help="Run on N processes with torch.distributed: launches torchrun (DDP; gloo on CPU, nccl on CUDA).",
)
@click.option("--quiet", "-q", is_flag=True, help="No progress bar.")
@json_option
@click.pass_context
def finetune_check(
    ctx: click.Context,
    /,
    checkpoint: str,
    arch: str,
    arch_args: tuple[str, ...],
    nproc: int | None,
    quiet: bool,
    as_json: bool,
    operations: tuple[Any, ...],
    plan_base: Any,
    **kw: Any,
) -> None:
    """Prove that CHECKPOINT loads into --arch and fine-tunes: load, freeze, train briefly, check.

    The migrate operations (--plan, --strip-prefix, --rename, --drop, --fill-missing,
    --drop-unexpected, --reinit-mismatched, ...) apply in the order given, as in ckpt migrate;
    a plan's own arch and key are not used (give --arch and --key).
    Under torchrun (or with --nproc N) each process trains its shard in DistributedDataParallel
    and rank 0 prints the one report.

    Exit codes: 0 every check passed, 1 a check failed, 2 bad input or arguments.
    """
    from ..arch import parse_arch_args
    from ..finetune import FinetuneOptions
    from ..finetune import finetune_check as run

    kw["freeze"], kw["trainable"] = tuple(kw["freeze"]), tuple(kw["trainable"])
    options = FinetuneOptions(arch_args=parse_arch_args(arch_args), operations=tuple(operations), **kw)
    if nproc is not None and nproc > 1 and "WORLD_SIZE" not in os.environ:
        from ..finetune.options import _validate

        _validate(options)  # argument errors are one line here, not one per process
        sys.exit(_launch(nproc, ctx.meta[_RAW_ARGS]))
    lead = int(os.environ.get("RANK", "0")) == 0
    bar = None if quiet or not lead or not sys.stderr.isatty() else _ProgressBar()
    report = run(checkpoint, arch, options, progress=bar, on_setup=_print_setup if lead and not as_json else None)
    if bar is not None:
        bar.close()
    if lead:
        echo(dumps(report) if as_json else render_results(report))
    code = 0 if report.passed else EXIT_FAILED
    if lead and os.environ.get(_EXIT_FILE):
        with open(os.environ[_EXIT_FILE], "w") as f:
            f.write(str(code))
    # the other ranks exit 0: rank 0 speaks for the run, and torchrun then reports its code alone
    if lead and code:
        sys.exit(code)


_EXIT_FILE = "CKPT_FINETUNE_EXIT_FILE"


def _launch(nproc: int, args: list[str]) -> int:
    """Run this command again under torchrun on ``nproc`` processes; rank 0's exit code is the answer."""
    from ..finetune.distributed import torchrun_argv

    rest, skip = [], False
    for arg in args:
        if skip:
            skip = False
        elif arg == "--nproc":
            skip = True
        elif not arg.startswith("--nproc="):
            rest.append(arg)
    with tempfile.TemporaryDirectory() as tmp:
        exit_file = os.path.join(tmp, "exit")
        env = {**os.environ, _EXIT_FILE: exit_file, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
        sys.stdout.flush()
        code = subprocess.run(torchrun_argv(nproc, ["finetune-check", *rest]), env=env).returncode
        if os.path.exists(exit_file):
            with open(exit_file) as f:
                return int(f.read().strip() or code)
    return code if code in (0, 1, 2) else 3


class _ProgressBar:
    """One line on stderr, redrawn after each step: phase, epoch x/N, step, loss, images/s, ETA."""

    def __init__(self) -> None:
        self.drawn = False

    def __call__(self, event: Any) -> None:
        width = 20
        done = int(width * event.step / max(event.steps, 1))
        epochs = f"/{event.epochs}" if event.epochs else ""
        eta = f" ETA {_duration(event.eta_s)}" if event.eta_s is not None else ""
        sys.stderr.write(
            f"\r{event.phase} epoch {event.epoch}{epochs} [{'#' * done}{'.' * (width - done)}] "
            f"step {event.step}/{event.steps} loss {event.loss:.4f} {event.images_per_s:.1f} img/s{eta} "
        )
        sys.stderr.flush()
        self.drawn = True

    def close(self) -> None:
        if self.drawn:
            sys.stderr.write("\n")


def _duration(seconds: float) -> str:
    seconds = max(0, round(seconds))
    return f"{seconds // 60}:{seconds % 60:02d}"


def _print_setup(setup: Any) -> None:
    echo(render_setup(setup))
    sys.stdout.flush()


def render_setup(setup: Any) -> str:
    """What is known before training: the run, the load table, the head, the freeze table."""
    load = setup.load
    ranks = f" x {setup.world_size} processes" if setup.world_size > 1 else ""
    size = f"{setup.image_size}px" + (f" (forward pass at {setup.forward_size}px)" if setup.forward_size else "")
    lines = [
        f"{setup.checkpoint} -> {setup.arch} on {setup.device}{ranks}, data {setup.data}, {size}, "
        f"{setup.num_classes or '?'} classes"
    ]
    if load.operations:
        lines.append("operations: " + ", ".join(load.operations))
    lines.append(
        f"load: {load.loaded}/{load.model_keys} model tensors loaded from {load.checkpoint_keys}; "
        f"{len(load.missing)} missing, {len(load.unexpected)} unexpected, {len(load.mismatched)} mismatched"
    )
    rows = [("missing", k, "-", shape_str(load.missing_shapes.get(k))) for k in load.missing]
    rows += [("unexpected", k, shape_str(load.unexpected_shapes.get(k)), "-") for k in load.unexpected]
    rows += [("mismatched", m.key, shape_str(m.shape), shape_str(m.target_shape)) for m in load.mismatched]
    if rows:
        head = set(load.head_keys)
        rows = [(paint(kind + (" (head)" if key in head else ""), kind), key, a, b) for kind, key, a, b in rows]
        lines += ["", table(rows[:20], ["", "key", "checkpoint", "model"])]
        if len(rows) > 20:
            lines.append(f"... {len(rows) - 20} more (--json lists them all)")
    if setup.head:
        aux = f" (and the auxiliary {', '.join(setup.head.aux)})" if setup.head.aux else ""
        lines.append(f"head: {setup.head.module} {setup.head.old} -> {setup.head.new}{aux}")
    if any(p.by_model for p in setup.params):
        params = table(
            [
                (p.module, human_count(p.trainable), human_count(p.frozen), human_count(p.by_model))
                for p in setup.params
            ],
            ["module", "trainable", "frozen", "frozen by the model"],
            ["left", "right", "right", "right"],
        )
    else:
        params = table(
            [(p.module, human_count(p.trainable), human_count(p.frozen)) for p in setup.params],
            ["module", "trainable", "frozen"],
            ["left", "right", "right"],
        )
    lines += ["", params]
    return "\n".join(lines)


def render_results(report: Any) -> str:
    """What training found: phases, epochs, checks, verdict."""
    lines: list[str] = []
    if report.phases:
        lines += [
            "",
            table(
                [
                    (
                        p.name,
                        p.epochs,
                        f"{p.lr:g}",
                        p.scheduler,
                        p.steps,
                        human_count(p.trainable),
                        human_count(p.frozen),
                        f"{p.images_per_s:.1f}" if p.images_per_s else "-",
                    )
                    for p in report.phases
                ],
                ["phase", "epochs", "lr", "scheduler", "steps", "trainable", "frozen", "images/s"],
            ),
        ]
    if report.epochs:
        lines += [
            "",
            table(
                [
                    (
                        e.phase,
                        e.epoch,
                        f"{e.lr:g}" if e.epoch else "-",
                        e.steps if e.epoch else "-",
                        _num(e.train_loss),
                        _num(e.heldout_loss),
                        "-" if e.heldout_accuracy is None else f"{e.heldout_accuracy:.1%}",
                        f"{e.images_per_s:.1f}" if e.images_per_s else "-",
                    )
                    for e in report.epochs
                ],
                ["phase", "epoch", "lr", "steps", "train loss", "held-out loss", "held-out acc", "images/s"],
            ),
        ]
    lines += [
        "",
        table([(c.name, paint(c.status.upper()), c.detail) for c in report.checks], ["check", "status", "detail"]),
    ]
    if report.saved:
        lines.append(f"\nsaved fine-tuned weights to {report.saved}")
    if report.plot:
        lines.append(f"curves drawn to {report.plot}")
    failed = report.failed
    lines.append(
        "\n"
        + (
            paint("PASS") + ": every check passed"
            if not failed
            else paint("FAIL") + f": {len(failed)} check(s) failed: " + ", ".join(c.name for c in failed)
        )
    )
    return "\n".join(lines)


def render(report: Any) -> str:
    """The whole human report: the setup tables, then the results."""
    return render_setup(report.setup) + "\n" + render_results(report)


def _num(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"


COMMANDS = [finetune_check]
