"""``ckpt finetune-check``: parse, call :func:`ckpt_tool.finetune.finetune_check`, render."""

from __future__ import annotations

import sys
from typing import Any

import click

from ..render import dumps, echo, human_count, json_option, paint, shape_str, table

EXIT_FAILED = 1


@click.command("finetune-check")
@click.argument("checkpoint", type=click.Path(dir_okay=True))
@click.option("--arch", required=True, help="Target: torchvision name, pkg.module:factory, file.py:factory or timm:NAME.")
@click.option("--arch-arg", "arch_args", multiple=True, metavar="NAME=VALUE", help="Keyword argument for the factory.")
@click.option("--key", default=None, help="Path to the nested state dict (e.g. model, state_dict, ckpt/ema).")
@click.option("--strip-prefix", multiple=True, metavar="PREFIX", help="Remove PREFIX (e.g. module.) from keys.")
@click.option("--add-prefix", multiple=True, metavar="PREFIX", help="Put PREFIX in front of every key.")
@click.option("--rename", multiple=True, metavar="REGEX=REPL", help="Rename keys with re.sub.")
@click.option("--drop", multiple=True, metavar="MODULE", help="Drop a module's keys from the checkpoint.")
@click.option("--plan", "plan_file", default=None, type=click.Path(dir_okay=False),
              help="Apply a migrate plan file (before the inline operations).")
@click.option("--strict", is_flag=True, help="Fail on any missing or unexpected key (besides a replaced head).")
@click.option("--num-classes", type=int, default=None, help="Replace the classification head with one of N classes.")
@click.option("--head", default=None, metavar="MODULE", help="The head to replace, when it is not found by name.")
@click.option("--freeze", multiple=True, metavar="PATTERN",
              help="Freeze parameters: module path, glob, range (features.0-9) or re:REGEX.")
@click.option("--trainable", multiple=True, metavar="PATTERN", help="Train only these; everything else is frozen.")
@click.option("--freeze-first", type=int, default=None, metavar="N", help="Freeze the first N layers of features.")
@click.option("--freeze-epochs", type=int, default=0, metavar="K",
              help="Train with the freezing for K epochs, then unfreeze everything.")
@click.option("--unfreeze-lr", type=float, default=None, help="Learning rate after unfreezing (default --lr / 10).")
@click.option("--freeze-bn", is_flag=True, help="Keep frozen BatchNorm layers in eval mode (running stats fixed).")
@click.option("--data", default="synthetic", show_default=True,
              help="synthetic, synthetic:N, imagefolder:DIR or cifar10:DIR (never downloads).")
@click.option("--image-size", type=int, default=None, help="Input size (default: the architecture's, usually 224).")
@click.option("--epochs", type=int, default=1, show_default=True)
@click.option("--max-steps", type=int, default=None, help="At most N steps per epoch.")
@click.option("--batch-size", type=int, default=16, show_default=True)
@click.option("--lr", type=float, default=1e-3, show_default=True)
@click.option("--optimizer", type=click.Choice(["adam", "sgd"]), default="adam", show_default=True)
@click.option("--device", default="auto", show_default=True, help="auto, cpu or cuda.")
@click.option("--amp", is_flag=True, help="Mixed precision (CUDA only).")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--overfit-steps", type=int, default=10, show_default=True, help="Steps of the overfit-one-batch check.")
@click.option("--eval-batches", type=int, default=2, show_default=True, help="Held-out batches for accuracy.")
@click.option("--plot", default=None, metavar="FILE.png", help="Draw the loss per step (needs matplotlib).")
@click.option("--save", default=None, metavar="OUT.safetensors", help="Write the fine-tuned weights.")
@click.option("--force", is_flag=True, help="Overwrite --save's file.")
@click.option("--quiet", "-q", is_flag=True, help="No progress bar.")
@json_option
def finetune_check(checkpoint: str, arch: str, arch_args: tuple[str, ...], plan_file: str | None, quiet: bool,
                   as_json: bool, **kw: Any) -> None:
    """Prove that CHECKPOINT loads into --arch and fine-tunes: load, freeze, train briefly, check.

    Exit codes: 0 every check passed, 1 a check failed, 2 bad input or arguments.
    """
    from ..arch import parse_arch_args
    from ..finetune import FinetuneOptions
    from ..finetune import finetune_check as run

    for name in ("strip_prefix", "add_prefix", "rename", "drop", "freeze", "trainable"):
        kw[name] = tuple(kw[name])
    options = FinetuneOptions(arch_args=parse_arch_args(arch_args), plan=plan_file, **kw)
    bar = None if quiet or not sys.stderr.isatty() else _ProgressBar()
    report = run(checkpoint, arch, options, progress=bar)
    if bar is not None:
        bar.close()
    if as_json:
        echo(dumps(report))
    else:
        echo(render(report))
    if not report.passed:
        sys.exit(EXIT_FAILED)


class _ProgressBar:
    """One line on stderr, redrawn after each step: phase, epoch, step, loss, images/s."""

    def __init__(self) -> None:
        self.drawn = False

    def __call__(self, event: Any) -> None:
        width = 20
        done = int(width * event.step / max(event.steps, 1))
        sys.stderr.write(f"\r{event.phase} epoch {event.epoch} [{'#' * done}{'.' * (width - done)}] "
                         f"{event.step}/{event.steps} loss {event.loss:.4f} {event.images_per_s:.1f} img/s ")
        sys.stderr.flush()
        self.drawn = True

    def close(self) -> None:
        if self.drawn:
            sys.stderr.write("\n")


def render(report: Any) -> str:
    """The human report: load, head, parameters, phases, checks, verdict."""
    load = report.load
    lines = [f"{report.checkpoint} -> {report.arch} on {report.device}, data {report.data}, "
             f"{report.image_size}px, {report.num_classes or '?'} classes"]
    if load.operations:
        lines.append("operations: " + ", ".join(load.operations))
    lines.append(f"load: {load.loaded}/{load.model_keys} model tensors loaded from {load.checkpoint_keys}; "
                 f"{len(load.missing)} missing, {len(load.unexpected)} unexpected, {len(load.mismatched)} mismatched")
    rows = [("missing", k, "-", "-") for k in load.missing]
    rows += [("unexpected", k, "-", "-") for k in load.unexpected]
    rows += [("mismatched", m.key, shape_str(m.checkpoint_shape), shape_str(m.model_shape)) for m in load.mismatched]
    if rows:
        head = set(load.head_keys)
        rows = [(paint(kind + (" (head)" if key in head else ""), kind), key, a, b) for kind, key, a, b in rows]
        lines += ["", table(rows[:20], ["", "key", "checkpoint", "model"])]
        if len(rows) > 20:
            lines.append(f"... {len(rows) - 20} more (--json lists them all)")
    if report.head:
        aux = f" (and the auxiliary {', '.join(report.head.aux)})" if report.head.aux else ""
        lines.append(f"head: {report.head.module} {report.head.old} -> {report.head.new}{aux}")
    lines += ["", table([(p.module, human_count(p.trainable), human_count(p.frozen)) for p in report.params],
                        ["module", "trainable", "frozen"], ["left", "right", "right"])]
    if report.phases:
        lines += ["", table([(p.name, p.epochs, f"{p.lr:g}", p.steps, human_count(p.trainable),
                              " ".join(f"{v:.4f}" for v in p.epoch_losses) or "-",
                              f"{p.images_per_s:.1f}" if p.images_per_s else "-") for p in report.phases],
                            ["phase", "epochs", "lr", "steps", "trainable", "epoch mean loss", "images/s"])]
    lines += ["", table([(c.name, paint(c.status.upper()), c.detail) for c in report.checks], ["check", "status", "detail"])]
    if report.saved:
        lines.append(f"\nsaved fine-tuned weights to {report.saved}")
    if report.plot:
        lines.append(f"loss curve drawn to {report.plot}")
    failed = report.failed
    lines.append("\n" + (paint("PASS") + ": every check passed" if not failed else
                         paint("FAIL") + f": {len(failed)} check(s) failed: " + ", ".join(c.name for c in failed)))
    return "\n".join(lines)


COMMANDS = [finetune_check]
