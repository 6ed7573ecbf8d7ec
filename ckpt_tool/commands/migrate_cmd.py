"""``ckpt migrate`` and ``ckpt convert``: parse, call :func:`ckpt_tool.migrate.migrate`, render."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

import click

from ..errors import EXIT_FINDINGS, EXIT_OK
from ..render import dumps, echo, human_bytes, json_option, paint, progress_bar, shape_str, some, table
from .options import OrderedCommand, arch_arg_option, arch_option, key_option, plan_operation_options

if TYPE_CHECKING:  # the reports a renderer reads: typed, so a renamed field fails mypy
    from ..compat import Compatibility
    from ..migrate import MigrateReport, MigrationPlan

_LIST_LIMIT = 10  # lines per list in the table view


def _conversion_options(f: Any) -> Any:
    """--dequantize and --densify: convert what the output format cannot hold (without them it is refused)."""
    f = click.option(
        "--densify",
        is_flag=True,
        help="Write sparse (COO/CSR) tensors dense (.safetensors refuses them otherwise; a .pth keeps them sparse).",
    )(f)
    return click.option(
        "--dequantize",
        is_flag=True,
        help="Write quantized (qint8/quint8/qint32) tensors as "
        "float32 (.safetensors refuses them otherwise; a .pth keeps them quantized).",
    )(f)


def _training_options(f: Any) -> Any:
    """--source-arch, --drop-optimizer, --also-key: what happens to a training checkpoint's state."""
    f = click.option(
        "--also-key",
        "also_keys",
        multiple=True,
        metavar="KEY",
        help="Give this sibling state dict "
        "(an EMA copy: state_dict_ema) the same operations and keep it beside the state dict "
        "(repeatable; .pth output).",
    )(f)
    f = click.option(
        "--drop-optimizer",
        is_flag=True,
        help="Leave the optimizer state out (it is carried into a "
        ".pth otherwise, each parameter's state following the parameter).",
    )(f)
    return click.option(
        "--source-arch",
        metavar="SPEC",
        help="The architecture that was trained (forms as --arch): "
        "its parameter order tells which optimizer id is which parameter.",
    )(f)


@click.command(cls=OrderedCommand)
@click.argument("source", required=False, type=click.Path(dir_okay=True))
@key_option
@click.option(
    "--keep-extras",
    is_flag=True,
    help="Keep plain-data top-level entries beside the state dict "
    "(epoch, config): in a .pth, as JSON in the safetensors metadata. Without it they are dropped "
    "(and listed). A training checkpoint (one with optimizer state) written to a .pth is carried whole.",
)
@plan_operation_options
@arch_option
@arch_arg_option
@click.option("--seed", type=int, default=0, show_default=True, help="torch.manual_seed before the target is built.")
@click.option(
    "-o",
    "--output",
    metavar="OUT",
    type=click.Path(dir_okay=False),
    help="Output file: .safetensors, or .pth/.pt/.bin (a state dict torch.load(weights_only=True) opens).",
)
@click.option(
    "--max-shard-size",
    metavar="SIZE",
    help="Write Hugging Face style shards of at most SIZE "
    "(2GB, 500MB; decimal units) with an index.json; one file when everything fits.",
)
@click.option("--force", is_flag=True, help="Replace an existing output (never the input: see --in-place).")
@click.option("--in-place", is_flag=True, help="Replace SOURCE itself (keeps SOURCE.bak).")
@click.option("--dry-run", is_flag=True, help="Show the plan and the resulting diff; write nothing.")
@click.option(
    "--input-shape",
    metavar="N,C,H,W",
    help="With --dry-run and --arch: the dummy input of the shape flow (default: the architecture's).",
)
@click.option(
    "--allow-mostly-new",
    is_flag=True,
    help="Write even when under half of the target's parameters "
    "come from the checkpoint (refused otherwise: it is probably the wrong --arch).",
)
@_conversion_options
@_training_options
@json_option
def migrate(
    source: str | None,
    key: str | None,
    keep_extras: bool,
    arch: str | None,
    arch_args: tuple[str, ...],
    seed: int,
    output: str | None,
    max_shard_size: str | None,
    force: bool,
    in_place: bool,
    dry_run: bool,
    allow_mostly_new: bool,
    dequantize: bool,
    densify: bool,
    as_json: bool,
    operations: tuple[Any, ...],
    plan_base: Any,
    source_arch: str | None,
    drop_optimizer: bool,
    also_keys: tuple[str, ...],
    input_shape: str | None = None,
) -> None:
    """Rename, filter, drop, cast and re-head SOURCE into a checkpoint that loads into a target.

    Operations apply in the order given and are shown as a plan before anything is written.
    Tensor bytes are streamed from SOURCE to OUT (no torch import when they only move); the
    write is atomic (temporary file, fsync, rename). The output is then verified by value: re-read
    and compared with its sources tensor by tensor and, with --arch, loaded into the target with
    strict=True and its state_dict() compared with the output.

    \b
    Exit codes:
      0  written and verified (with --arch: loads strictly, every value as planned)
      1  written, but it does not load strictly, a value is not as planned, or it holds NaN/Inf
         (--dry-run: the planned result would not load)
      2  usage or input errors, an operation that matches no key, or under half of the
         target's parameters from the checkpoint without --allow-mostly-new (nothing is written)
    """
    from ..arch import parse_arch_args
    from ..diff.shapeflow import parse_input_shape
    from ..migrate import migrate as run
    from ..plan import Plan
    from ..writer import parse_size

    base = plan_base
    plan = Plan(
        source=source or base.source,
        key=key if key is not None else base.key,
        arch=arch or base.arch,
        arch_args=parse_arch_args(arch_args) if arch_args else (base.arch_args if arch in (None, base.arch) else {}),
        operations=tuple(operations),
        source_arch=source_arch or base.source_arch,
        drop_optimizer=drop_optimizer or base.drop_optimizer,
        also_keys=tuple(also_keys) or base.also_keys,
    )
    with progress_bar("writing", enabled=not dry_run) as progress:
        report = run(
            plan,
            output,
            seed=seed,
            keep_extras=keep_extras,
            max_shard_size=parse_size(max_shard_size) if max_shard_size else None,
            force=force,
            in_place=in_place,
            dry_run=dry_run,
            allow_mostly_new=allow_mostly_new,
            on_plan=None if as_json else _render_plan,
            progress=progress,
            dequantize=dequantize,
            densify=densify,
            input_shape=parse_input_shape(input_shape) if input_shape is not None else None,
        )
    _finish(report, as_json)


@click.command()
@click.argument("source", type=click.Path(dir_okay=True))
@click.argument("output", type=click.Path(dir_okay=True))
@key_option
@click.option("--max-shard-size", metavar="SIZE", help="Write Hugging Face style shards of at most SIZE (2GB).")
@click.option("--force", is_flag=True, help="Replace an existing OUTPUT.")
@click.option(
    "--format",
    "to",
    type=click.Choice(["dcp"]),
    help="Write OUTPUT as a torch.distributed.checkpoint "
    "directory (.metadata and __0_0.distcp) instead of the format its extension names (needs torch).",
)
@_conversion_options
@json_option
def convert(
    source: str,
    output: str,
    key: str | None,
    max_shard_size: str | None,
    force: bool,
    to: str | None,
    dequantize: bool,
    densify: bool,
    as_json: bool,
) -> None:
    """Rewrite SOURCE as OUTPUT in the format OUTPUT's extension names, with byte-identical tensors.

    `ckpt migrate` with no operations: .pth -> .safetensors, .safetensors -> .pth, one file ->
    shards. Streamed, atomic, no torch import.

    \b
    Exit codes: 0 written; 2 usage or input errors.
    """
    from ..migrate import convert as run
    from ..writer import parse_size

    with progress_bar("writing") as progress:
        report = run(
            source,
            output,
            key=key,
            force=force,
            max_shard_size=parse_size(max_shard_size) if max_shard_size else None,
            progress=progress,
            dequantize=dequantize,
            densify=densify,
            on_plan=None if as_json else _render_notes,
            to=to,
        )
    _finish(report, as_json)


def _finish(report: MigrateReport, as_json: bool) -> None:
    if as_json:
        echo(dumps(report))
    else:
        _render_result(report)
    raise click.exceptions.Exit(EXIT_OK if report.ok else EXIT_FINDINGS)


def _render_plan(plan: MigrationPlan) -> None:
    where = f", state dict at {plan.state_path}" if plan.state_path else ""
    out = f"{plan.output} ({plan.output_format})" if plan.output else "(no output)"
    echo(f"migrate {plan.source} ({plan.source_format}{where}) -> {out}")
    if plan.steps:
        rows = []
        for i, s in enumerate(plan.steps, 1):
            examples = [f"{a} -> {b}" for a, b in s.renamed] + list(s.dropped) + list(s.added) + list(s.reinitialised)
            examples += list(s.cast) + list(s.adapted)
            rows.append(
                (
                    i,
                    s.operation,
                    len(s.dropped),
                    len(s.renamed),
                    len(s.added),
                    len(s.reinitialised),
                    len(s.cast),
                    some(examples, 2) or "(no keys matched)",
                )
            )
        echo(
            table(
                rows,
                ["#", "operation", "dropped", "renamed", "added", "reinit", "cast", "keys"],
                ["right", "left", "right", "right", "right", "right", "right", "left"],
            )
        )
    else:
        echo("no operations: tensors are copied as they are")
    echo(
        f"result: {plan.tensors} tensors, {human_bytes(plan.tensor_bytes)}"
        + (f" in {len(plan.files)} files" if len(plan.files) > 1 else "")
    )
    for t in plan.initialised[:_LIST_LIMIT]:
        echo(f"  initialised from {plan.arch}: {t.key} {shape_str(t.shape)} ({t.reason})")
    if len(plan.initialised) > _LIST_LIMIT:
        echo(f"  ... and {len(plan.initialised) - _LIST_LIMIT} more initialised (--json lists them all)")
    for a in plan.adapted[:_LIST_LIMIT]:
        source = (
            f" from {a.origin} {shape_str(a.origin_shape)}"
            if a.origin != a.key
            else f" from {shape_str(a.origin_shape)}"
            if a.origin_shape != a.shape
            else ""
        )
        echo(f"  computed: {a.key} {shape_str(a.shape)}{source} ({a.how})")
    if len(plan.adapted) > _LIST_LIMIT:
        echo(f"  ... and {len(plan.adapted) - _LIST_LIMIT} more computed (--json lists them all)")
    for group in plan.shared[:_LIST_LIMIT]:
        words = {
            "one storage": "written once, one storage",
            "alias": f"written once as {group.written_as}, the others recorded as aliases in the metadata",
            "copies": "different views of one storage, written as copies",
        }
        echo(f"  shared storage: {some(group.keys)}: {words[group.how]}")
    if len(plan.shared) > _LIST_LIMIT:
        echo(f"  ... and {len(plan.shared) - _LIST_LIMIT} more groups of shared tensors (--json lists them all)")
    if plan.extras_kept:
        echo(f"  extras kept: {', '.join(plan.extras_kept)}")
    for name, why in plan.extras_dropped.items():
        echo(f"  extra dropped: {name} ({why})")
    for note in plan.notes[:_LIST_LIMIT]:
        echo(f"  note: {note}")
    if len(plan.notes) > _LIST_LIMIT:
        echo(f"  ... and {len(plan.notes) - _LIST_LIMIT} more notes (--json lists them all)")
    _render_training(plan)
    if plan.diff is not None:
        echo(f"against {plan.arch}: " + _diff_words(plan.diff))
    flow = plan.shape_flow
    if flow is not None and flow.status in ("fails", "not_checked"):
        echo(f"shape flow {'fails' if flow.fails else 'not checked'}: {flow.message}")
    echo()


def _render_training(plan: MigrationPlan) -> None:
    """What happens to the optimizer state and the --also-key state dicts."""
    for o in plan.optimizers:
        groups = ", ".join(str(n) for n in o.groups)
        echo(
            f"  optimizer {o.path} ({o.kind}, {len(o.groups)} param group{'s' * (len(o.groups) != 1)} of {groups}; "
            f"ids from {o.mapped_by}): state of {len(o.carried)} parameters carried"
            + (f", {len(o.dropped)} dropped ({some(list(o.dropped), 2)})" if o.dropped else "")
            + (f", {len(o.fresh)} start fresh ({some(list(o.fresh), 2)})" if o.fresh else "")
            + (f", {len(o.cast)} cast with their parameter" if o.cast else "")
        )
        moved = [f"{a} -> {b}" for a, b in o.carried if a != b]
        if moved:
            echo(f"    follows its parameter: {some(moved, 2)}")
    for a in plan.also:
        changed = sum(s.affected for s in a.steps)
        echo(f"  also {a.key}: the same operations, {a.tensors} tensors ({changed} keys changed)")


def _render_notes(plan: MigrationPlan) -> None:
    for note in plan.notes:
        echo(f"note: {note}")


def _diff_words(diff: Compatibility | None) -> str:
    if diff is None:  # the load itself failed: the error says why
        return "does NOT load"
    if diff.loads:
        return "loads with strict=True"
    parts = []
    if diff.missing:
        parts.append(f"{len(diff.missing)} missing ({some(diff.missing)})")
    if diff.unexpected:
        parts.append(f"{len(diff.unexpected)} unexpected ({some(diff.unexpected)})")
    if diff.mismatched:
        parts.append(
            f"{len(diff.mismatched)} shape mismatches ("
            + some([f"{m.key} {shape_str(m.shape)} vs {shape_str(m.target_shape)}" for m in diff.mismatched])
            + ")"
        )
    return "does NOT load strictly: " + "; ".join(parts)


def _render_result(report: MigrateReport) -> None:
    if report.dry_run:
        echo("dry run: nothing written")
        return
    w = report.written
    assert w is not None, "a migrate that was not a dry run wrote its output"
    files = f"{len(w.files)} files, index {w.path}" if len(w.files) > 1 else w.path
    if not w.committed:
        echo(
            paint("not written:", "fail")
            + f" {files} failed its verification, so the staged output was removed and nothing under"
            " its name changed"
        )
    else:
        echo(f"wrote {files}: {w.tensors} tensor{'s' * (w.tensors != 1)}, {human_bytes(w.tensor_bytes)} ({w.format})")
    if w.backup:
        echo(f"backup of the input: {w.backup}")
    if w.removed:
        names = [os.path.basename(f) for f in w.removed]
        echo(f"removed {len(names)} shard{'s' * (len(names) != 1)} of the set it replaced: {some(names)}")
    if report.nonfinite:
        echo(f"NaN/Inf in {len(report.nonfinite)} written tensors: {some(report.nonfinite)}")
    v = report.verification
    if v is None:
        return
    if v.method in ("headers", "headers_memory"):
        why = "torch is not installed" if v.method == "headers" else "too large to build here"
        echo(
            f"checked: the written keys and shapes match {v.arch} ({why}: not loaded)"
            if v.loads
            else f"check failed: {v.arch} " + _diff_words(v.diff)
        )
        return
    if not v.loads:
        echo(
            paint("verification failed:", "fail")
            + f" {v.arch} "
            + _diff_words(v.diff)
            + (f" ({v.error})" if v.error else "")
        )
        return
    if v.differ:
        echo(
            paint("verification failed:", "fail")
            + f" {len(v.differ)} written {'entry is' if len(v.differ) == 1 else 'entries are'} not what the plan"
            f" intended: {some(v.differ)}"
        )
        return
    where = f"{v.from_checkpoint} from the checkpoint" + "".join(
        f", {n} {what}"
        for n, what in (
            (v.computed, "computed from it"),
            (v.tied, "tied to their partner"),
            (v.filled, "filled from the target"),
            (v.reinitialised, "re-initialised"),
        )
        if n
    )
    beside = v.checked - (
        v.from_checkpoint + v.computed + v.filled + v.reinitialised + v.tied
    )  # optimizer, EMA: carried
    where += f", {beside} of the training state beside it" if beside > 0 else ""
    if v.arch is None:
        same = "as planned" if v.computed else "identical to their sources"
        echo(paint("verified:", "pass") + f" re-read, {v.checked} tensors {same} ({where})")
    else:
        echo(
            paint("verified:", "pass")
            + f" loads into {v.arch} with strict=True, {v.checked} tensors as planned ({where}); "
            f"{_percent(v.checkpoint_share)} of {v.arch}'s parameters come from the checkpoint"
        )
    aliases = [k for group in report.plan.shared if group.how == "alias" for k in group.keys if k != group.written_as]
    if aliases:
        one = len(aliases) == 1
        echo(
            f"  {len(aliases)} {'tensor' if one else 'tensors'} ({some(aliases)}) "
            f"{'shares' if one else 'share'} a storage with a written tensor and {'is' if one else 'are'} "
            "recorded as an alias in ckpt.aliases, not written twice: transformers' from_pretrained ties "
            f"{'it' if one else 'them'} again; safetensors' load_file gives no key for "
            f"{'it' if one else 'them'}, so a plain load_state_dict(strict=True) reports "
            f"{'it' if one else 'them'} missing"
        )


def _percent(share: float | None) -> str:
    if share is None:
        return "-"
    text = f"{share:.1%}"
    # never round a gap away, nor a few kept values to nothing
    if text == "100.0%" and share < 1:
        return f"{share:.4%}"
    return f"{share:.4%}" if text == "0.0%" and share > 0 else text


COMMANDS = [migrate, convert]
