"""``ckpt migrate`` and ``ckpt convert``: parse, call :func:`ckpt_tool.migrate.migrate`, render."""

from __future__ import annotations

from typing import Any

import click

from ..render import dumps, echo, human_bytes, json_option, paint, progress_bar, shape_str, some, table

EXIT_OK, EXIT_FINDINGS = 0, 1
# options that are operations: applied in the order they appear on the command line
_ORDERED = ("drop", "keep", "exclude", "rename", "strip_prefix", "add_prefix", "map_file", "dtype", "plan_file",
            "fill_missing", "drop_unexpected", "reinit_mismatched")
_ORDER_KEY = "ckpt.migrate.order"
_LIST_LIMIT = 10  # lines per list in the table view


class _OrderedCommand(click.Command):
    """Click gathers each option's values separately; this keeps their interleaving (--rename a --drop b --rename c)."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        _, _, order = self.make_parser(ctx).parse_args(args=list(args))
        ctx.meta[_ORDER_KEY] = [p.name for p in order if p.name in _ORDERED]
        return super().parse_args(ctx, args)


def _conversion_options(f: Any) -> Any:
    """--dequantize and --densify: convert what the output format cannot hold (without them it is refused)."""
    f = click.option("--densify", is_flag=True, help="Write sparse (COO/CSR) tensors dense (.safetensors "
                     "refuses them otherwise; a .pth keeps them sparse).")(f)
    return click.option("--dequantize", is_flag=True, help="Write quantized (qint8/quint8/qint32) tensors as "
                        "float32 (.safetensors refuses them otherwise; a .pth keeps them quantized).")(f)


@click.command(cls=_OrderedCommand)
@click.argument("source", required=False, type=click.Path(dir_okay=True))
@click.option("--key", metavar="PATH", help="Nested state dict to operate on (model_state_dict, state_dict/ema). "
              "Other top-level entries are dropped unless --keep-extras.")
@click.option("--keep-extras", is_flag=True, help="Keep plain-data top-level entries (epoch, config): beside the "
              "state dict in a .pth, as JSON in the safetensors metadata. Optimizer state is never kept.")
@click.option("--drop", multiple=True, metavar="PREFIX", help="Drop a module and everything under it "
              "(classifier.6 drops classifier.6.weight, not classifier.60.weight).")
@click.option("--keep", multiple=True, metavar="REGEX", help="Keep only the keys REGEX matches (re.search).")
@click.option("--exclude", multiple=True, metavar="REGEX", help="Drop the keys REGEX matches (re.search).")
@click.option("--rename", multiple=True, metavar="REGEX=REPL", help="Rename keys with re.sub (groups as \\1); "
              "split at the last '='.")
@click.option("--strip-prefix", multiple=True, metavar="PREFIX", help="Remove PREFIX (module.) where keys start with it.")
@click.option("--add-prefix", multiple=True, metavar="PREFIX", help="Put PREFIX (backbone.) in front of every key.")
@click.option("--map", "map_file", multiple=True, metavar="FILE", type=click.Path(dir_okay=False),
              help="Rename by a JSON object of old key -> new key.")
@click.option("--dtype", multiple=True, type=click.Choice(["float16", "bfloat16", "float32"]),
              help="Cast floating tensors (integer tensors and buffers such as num_batches_tracked are untouched).")
@click.option("--plan", "plan_file", multiple=True, metavar="FILE", type=click.Path(dir_okay=False),
              help="Apply a plan saved by `ckpt diff --plan-out` (its source, --key and --arch apply unless given).")
@click.option("--arch", metavar="SPEC", help="Target architecture (as for diff): vgg16, pkg.module:factory, "
              "path/to/file.py:factory or timm:NAME. Enables the three policies and the strict-load check.")
@click.option("--arch-arg", "arch_args", multiple=True, metavar="NAME=VALUE", help="Keyword argument for --arch (repeatable).")
@click.option("--fill-missing", is_flag=True, help="Keys the target has and the checkpoint lacks take the target's initialisation.")
@click.option("--drop-unexpected", is_flag=True, help="Drop keys the target has no place for.")
@click.option("--reinit-mismatched", is_flag=True, help="Keys whose shape differs take the target's initialisation.")
@click.option("--seed", type=int, default=0, show_default=True, help="torch.manual_seed before the target is built.")
@click.option("-o", "--output", metavar="OUT", type=click.Path(dir_okay=False),
              help="Output file: .safetensors, or .pth/.pt/.bin (a state dict torch.load(weights_only=True) opens).")
@click.option("--max-shard-size", metavar="SIZE", help="Write Hugging Face style shards of at most SIZE "
              "(2GB, 500MB; decimal units) with an index.json; one file when everything fits.")
@click.option("--force", is_flag=True, help="Replace an existing output (never the input: see --in-place).")
@click.option("--in-place", is_flag=True, help="Replace SOURCE itself (keeps SOURCE.bak).")
@click.option("--dry-run", is_flag=True, help="Show the plan and the resulting diff; write nothing.")
@_conversion_options
@json_option
@click.pass_context
def migrate(ctx: click.Context, /, source: str | None, key: str | None, keep_extras: bool, arch: str | None,
            arch_args: tuple[str, ...], seed: int, output: str | None, max_shard_size: str | None, force: bool,
            in_place: bool, dry_run: bool, dequantize: bool, densify: bool, as_json: bool, **ordered: Any) -> None:
    """Rename, filter, drop, cast and re-head SOURCE into a checkpoint that loads into a target.

    Operations apply in the order given and are shown as a plan before anything is written.
    Tensor bytes are streamed from SOURCE to OUT (no torch import when they only move); the
    write is atomic (temporary file, fsync, rename). With --arch the output is then loaded into
    the target with strict=True.

    \b
    Exit codes:
      0  written (and, with --arch, loads strictly into the target)
      1  written, but it does not load strictly, or holds NaN/Inf
         (--dry-run: the planned result would not load)
      2  usage or input errors (nothing is written)
    """
    from ..arch import parse_arch_args
    from ..migrate import migrate as run
    from ..plan import Plan
    from ..writer import parse_size

    operations, base = _operations(ctx, ordered)
    plan = Plan(
        source=source or base.source, key=key if key is not None else base.key, arch=arch or base.arch,
        arch_args=parse_arch_args(arch_args) if arch_args else (base.arch_args if arch in (None, base.arch) else {}),
        operations=tuple(operations),
    )
    with progress_bar("writing", enabled=not dry_run) as progress:
        report = run(plan, output, seed=seed, keep_extras=keep_extras,
                     max_shard_size=parse_size(max_shard_size) if max_shard_size else None, force=force,
                     in_place=in_place, dry_run=dry_run, on_plan=None if as_json else _render_plan,
                     progress=progress, dequantize=dequantize, densify=densify)
    _finish(report, as_json)


@click.command()
@click.argument("source", type=click.Path(dir_okay=True))
@click.argument("output", type=click.Path(dir_okay=False))
@click.option("--key", metavar="PATH", help="Nested state dict to convert (model_state_dict).")
@click.option("--max-shard-size", metavar="SIZE", help="Write Hugging Face style shards of at most SIZE (2GB).")
@click.option("--force", is_flag=True, help="Replace an existing OUTPUT.")
@_conversion_options
@json_option
def convert(source: str, output: str, key: str | None, max_shard_size: str | None, force: bool, dequantize: bool,
            densify: bool, as_json: bool) -> None:
    """Rewrite SOURCE as OUTPUT in the format OUTPUT's extension names, with byte-identical tensors.

    `ckpt migrate` with no operations: .pth -> .safetensors, .safetensors -> .pth, one file ->
    shards. Streamed, atomic, no torch import.

    \b
    Exit codes: 0 written; 2 usage or input errors.
    """
    from ..migrate import convert as run
    from ..writer import parse_size

    with progress_bar("writing") as progress:
        report = run(source, output, key=key, force=force,
                     max_shard_size=parse_size(max_shard_size) if max_shard_size else None, progress=progress,
                     dequantize=dequantize, densify=densify, on_plan=None if as_json else _render_notes)
    _finish(report, as_json)


def _operations(ctx: click.Context, values: dict[str, Any]) -> tuple[list[Any], Any]:
    """The operations in command-line order; ``--plan`` files expand where they stand."""
    from ..plan import Plan, load_mapping, load_plan, operation, parse_rename

    ops: list[Any] = []
    base = Plan()
    seen: dict[str, int] = {}
    for name in ctx.meta.get(_ORDER_KEY, []):
        i = seen.get(name, 0)
        seen[name] = i + 1
        value = values[name]
        if isinstance(value, tuple):
            value = value[i]
        if name == "plan_file":
            loaded = load_plan(value)
            base = loaded if base.source is None and not base.operations else base
            ops.extend(loaded.operations)
        elif name == "rename":
            ops.append(parse_rename(value))
        elif name == "map_file":
            ops.append(load_mapping(value))
        elif name == "dtype":
            ops.append(operation("cast", dtype=value))
        elif name in ("drop", "strip_prefix", "add_prefix"):
            ops.append(operation(name, prefix=value))
        elif name in ("keep", "exclude"):
            ops.append(operation(name, pattern=value))
        else:
            ops.append(operation(name))
    return ops, base


def _finish(report: Any, as_json: bool) -> None:
    if as_json:
        echo(dumps(report))
    else:
        _render_result(report)
    raise click.exceptions.Exit(EXIT_OK if report.ok else EXIT_FINDINGS)


def _render_plan(plan: Any) -> None:
    where = f", state dict at {plan.state_path}" if plan.state_path else ""
    out = f"{plan.output} ({plan.output_format})" if plan.output else "(no output)"
    echo(f"migrate {plan.source} ({plan.source_format}{where}) -> {out}")
    if plan.steps:
        rows = []
        for i, s in enumerate(plan.steps, 1):
            examples = [f"{a} -> {b}" for a, b in s.renamed] + list(s.dropped) + list(s.added) + list(s.reinitialised)
            examples += list(s.cast)
            rows.append((i, s.operation, len(s.dropped), len(s.renamed), len(s.added), len(s.reinitialised),
                         len(s.cast), some(examples, 2) or "(no keys matched)"))
        echo(table(rows, ["#", "operation", "dropped", "renamed", "added", "reinit", "cast", "keys"],
                   ["right", "left", "right", "right", "right", "right", "right", "left"]))
    else:
        echo("no operations: tensors are copied as they are")
    echo(f"result: {plan.tensors} tensors, {human_bytes(plan.tensor_bytes)}"
         + (f" in {len(plan.files)} files" if len(plan.files) > 1 else ""))
    for t in plan.initialised[:_LIST_LIMIT]:
        echo(f"  initialised from {plan.arch}: {t.key} {shape_str(t.shape)} ({t.reason})")
    if len(plan.initialised) > _LIST_LIMIT:
        echo(f"  ... and {len(plan.initialised) - _LIST_LIMIT} more initialised (--json lists them all)")
    for s in plan.shared[:_LIST_LIMIT]:
        words = {"one storage": "written once, one storage", "alias": f"written once as {s.written_as}, the others "
                 "recorded as aliases in the metadata", "copies": "different views of one storage, written as copies"}
        echo(f"  shared storage: {some(s.keys)}: {words[s.how]}")
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
    if plan.diff is not None:
        echo(f"against {plan.arch}: " + _diff_words(plan.diff))
    echo()


def _render_notes(plan: Any) -> None:
    for note in plan.notes:
        echo(f"note: {note}")


def _diff_words(diff: Any) -> str:
    if diff.loads:
        return "loads with strict=True"
    parts = []
    if diff.missing:
        parts.append(f"{len(diff.missing)} missing ({some(diff.missing)})")
    if diff.unexpected:
        parts.append(f"{len(diff.unexpected)} unexpected ({some(diff.unexpected)})")
    if diff.mismatched:
        parts.append(f"{len(diff.mismatched)} shape mismatches (" + some(
            [f"{m.key} {shape_str(m.shape)} vs {shape_str(m.target_shape)}" for m in diff.mismatched]) + ")")
    return "does NOT load strictly: " + "; ".join(parts)


def _render_result(report: Any) -> None:
    if report.dry_run:
        echo("dry run: nothing written")
        return
    w = report.written
    files = f"{len(w.files)} files, index {w.path}" if len(w.files) > 1 else w.path
    echo(f"wrote {files}: {w.tensors} tensor{'s' * (w.tensors != 1)}, {human_bytes(w.tensor_bytes)} ({w.format})")
    if w.backup:
        echo(f"backup of the input: {w.backup}")
    if report.nonfinite:
        echo(f"NaN/Inf in {len(report.nonfinite)} written tensors: {some(report.nonfinite)}")
    v = report.verification
    if v is not None:
        echo(paint(f"verified: loads into {v.arch} with strict=True", "pass") if v.loads
             else paint("verification failed:", "fail") + f" {v.arch} " + _diff_words(v.diff) + (f" ({v.error})" if v.error else ""))


COMMANDS = [migrate, convert]
