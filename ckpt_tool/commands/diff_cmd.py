"""``ckpt diff``: keys and shapes of a checkpoint against an architecture or another checkpoint, and a fix plan."""

from __future__ import annotations

from typing import TYPE_CHECKING

import click

from ..errors import EXIT_FINDINGS, EXIT_OK
from ..render import dumps, echo, human_count, json_option, note, paint, progress_bar, shape_str, table
from .options import arch_arg_option, arch_option, key_option, no_cache_option, target_key_option

if TYPE_CHECKING:  # the reports a renderer reads: typed, so a renamed field fails mypy
    from ..diff.report import DiffReport
    from ..optim_state.report import OptimizerDiff


@click.command()
@click.argument("checkpoint", type=click.Path(dir_okay=True))
@click.argument("target", required=False, type=click.Path(dir_okay=True))
@arch_option
@arch_arg_option
@key_option
@target_key_option
@click.option(
    "--values",
    is_flag=True,
    help="Also compare tensor values (TARGET checkpoint only): max |a-b| and "
    "relative change ||a-b||/||a|| per tensor, streamed.",
)
@click.option("--depth", type=int, metavar="N", help="One row per module prefix of N components instead of per key.")
@click.option("--all", "show_all", is_flag=True, help="Show matched rows too.")
@click.option(
    "--plan-out",
    metavar="FILE",
    type=click.Path(dir_okay=False),
    help="Save the fix plan as JSON (ckpt migrate --plan FILE applies it).",
)
@click.option(
    "--map-out",
    metavar="FILE",
    type=click.Path(dir_okay=False),
    help="Write the --map file a suggested command reads (keys paired by position: a re-implementation, a port).",
)
@click.option(
    "--input-shape",
    metavar="N,C,H,W",
    help="Dummy input of the shape flow, batch included "
    "(default: the architecture's, 1,3,224,224 for torchvision classifiers).",
)
@no_cache_option
@json_option
def diff(
    checkpoint: str,
    target: str | None,
    arch: str | None,
    arch_args: tuple[str, ...],
    key: str | None,
    target_key: str | None,
    values: bool,
    depth: int | None,
    show_all: bool,
    plan_out: str | None,
    map_out: str | None,
    input_shape: str | None,
    no_cache: bool,
    as_json: bool,
) -> None:
    """Compare CHECKPOINT's keys, shapes and dtypes with --arch or a TARGET checkpoint, and suggest a fix.

    Reads headers only (no tensor bytes unless --values). The report matches what
    load_state_dict(strict=False) returns: missing and unexpected keys, and the keys it would
    reject for a size mismatch. When they differ, a `ckpt migrate` command that makes the
    checkpoint load strictly is printed (and saved with --plan-out).

    torchvision's classification models at their defaults (or with num_classes) are answered from
    a table shipped with ckpt: no torch needed. Other targets are built once with torch and their
    key/shape table is cached on disk ($CKPT_CACHE_DIR, default ~/.cache/ckpt), so a repeat run
    imports neither torch nor torchvision.

    With --arch, the target's forward pass runs on the meta device (no weights, no compute) with
    a dummy input: a layer that cannot take what the one before it gives is named, with both sizes.

    \b
    Exit codes:
      0  the checkpoint would load strictly into the target (and the target runs)
      1  it would not (missing, unexpected or shape-mismatched keys), or the target's forward fails
      2  usage or input errors (bad file, bad --key, unknown architecture)
    """
    from ..diff import diff_paths
    from ..diff.shapeflow import parse_input_shape

    with progress_bar("comparing values", enabled=values) as progress:
        report = diff_paths(
            checkpoint,
            target,
            arch=arch,
            arch_args=arch_args,
            key=key,
            target_key=target_key,
            values=values,
            depth=depth,
            show_all=show_all,
            use_cache=not no_cache,
            plan_out=plan_out,
            progress=progress,
            map_out=map_out,
            input_shape=parse_input_shape(input_shape) if input_shape is not None else None,
        )
    if as_json:
        echo(dumps(report))
    else:
        _render(report)
    if report.plan_path:
        note(f"plan written to {report.plan_path}")
    if report.map_path:
        note(f"map written to {report.map_path}")
    raise click.exceptions.Exit(EXIT_OK if report.ok else EXIT_FINDINGS)


def _render_optimizer(o: OptimizerDiff | None) -> None:
    """Two training checkpoints: each side's optimizer-state defects, then their differences."""
    if o is None:
        return
    if not o.found:
        echo("optimizer state: the same parameters with state, shapes and hyper-parameters")
    for side, lines in (("checkpoint", o.source), ("target", o.target)):
        for line in lines:
            echo(f"optimizer state ({side}): {line}")
    for line in o.differences:
        echo(f"optimizer state differs: {line}")


def _render(report: DiffReport) -> None:
    c = report.counts
    where = f", state dict at {report.source_key}" if report.source_key else ""
    echo(f"checkpoint: {report.source} ({report.source_format}{where}, {c.source_keys} tensors)")
    if report.target_kind == "arch":
        args = ", ".join(f"{k}={v!r}" for k, v in sorted(report.arch_args.items()))
        echo(
            f"target:     {report.target}{f'({args})' if args else ''} ({c.target_keys} tensors; "
            f"signature {_CACHE_WORDS.get(report.cache or '', report.cache)})"
        )
    else:
        where = f", state dict at {report.target_key}" if report.target_key else ""
        echo(f"target:     {report.target} (checkpoint{where}, {c.target_keys} tensors)")
    echo(
        f"matched {c.matched}, missing {c.missing}, unexpected {c.unexpected}, shape mismatches "
        f"{c.shape_mismatches}, dtype differences {c.dtype_differences}" + (f", tied {c.tied}" if c.tied else "")
    )
    echo(f"fills {_share(c.filled_numel, c.target_numel)} of the target's {human_count(c.target_numel)} elements")
    if c.changed is not None:
        echo(f"values: {c.changed} tensors changed, {c.unchanged} unchanged")
    flow = report.shape_flow
    if flow is not None and flow.status == "fails":
        echo(paint("shape flow fails", "fail") + f" (input {shape_str(flow.input_shape)}, meta device): {flow.message}")
    elif flow is not None and flow.status == "not_checked":
        echo(f"shape flow not checked: {flow.message}")
    if report.plan.mostly_new:
        echo(
            f"WRONG ARCHITECTURE? only {_share_of(report.plan.checkpoint_share)} of {report.target}'s parameters "
            "would come from this checkpoint, whatever the fix"
        )
    echo()
    if report.rows:
        echo(_table(report))
    if report.hidden_rows:
        what = " or ".join(
            w
            for w, n in (("matched", 1), ("tied", report.counts.tied), ("torch-filled", report.counts.auto_filled))
            if n
        )
        echo(f"({report.hidden_rows} {what} {'modules' if report.depth else 'keys'} hidden; --all shows them)")
    for text in report.notes:
        note(f"note: {text}")
    _render_optimizer(report.optimizer)
    echo()
    plan = report.plan
    if report.loads_strictly and plan.cannot_run:
        echo(
            "loads strictly, but " + paint("the target cannot run", "fail") + ": no key operation can fix it; "
            "change the architecture"
        )
        return
    if report.loads_strictly and report.counts.tied:
        n = report.counts.tied
        echo(
            paint(f"loads strictly once its {n} tied {'key is' if n == 1 else 'keys are'} tied again", "pass")
            + " (as transformers' from_pretrained and safetensors' load_model do); a plain "
            "load_state_dict(strict=True) of these tensors reports them missing"
        )
        return
    if report.loads_strictly:
        echo(paint("loads strictly: load_state_dict(strict=True) would succeed", "pass"))
        return
    if plan.mostly_new:
        echo(
            paint("would not load strictly", "fail")
            + f", and only {_share_of(plan.checkpoint_share)} of {report.target}'s parameters "
            "would come from this checkpoint: it is probably not a checkpoint of this architecture."
        )
        echo("  Check --arch and --arch-arg. `ckpt migrate` refuses such a plan unless --allow-mostly-new is given.")
        for text in plan.notes:
            echo(f"  ! {text}")
        return
    echo(paint("would not load strictly.", "fail") + (" Suggested fix:" if plan.steps else ""))
    for step in plan.steps:
        echo(f"  - {step.operation['op']}: {step.reason}")
    for text in plan.notes:
        echo(f"  ! {text}")
    if plan.command:
        echo()
        echo(f"  {plan.command}")
        if not plan.resolves:
            echo("  (this leaves differences that only an --arch target can fill)")
        if plan.map_file and not report.map_path:
            echo(f"  (--map-out {plan.map_file} writes the map it reads; --plan-out holds it too)")


_CACHE_WORDS = {
    "table": "from ckpt's torchvision table",
    "hit": "from cache",
    "built": "built, cached",
    "rebuilt": "rebuilt (stale cache entry)",
    "off": "built, --no-cache",
    "uncacheable": "built, not cacheable",
    "unwritable": "built, cache unwritable",
}


def _table(report: DiffReport) -> str:
    if report.depth:
        modules = [
            (paint(r.status), r.name, _statuses(r.statuses), human_count(r.source_numel), human_count(r.target_numel))
            for r in report.rows
        ]
        return table(
            modules,
            ["status", "module", "keys", "checkpoint elements", "target elements"],
            ["left", "left", "left", "right", "right"],
        )
    headers = ["status", "key", "checkpoint", "target"]
    rows: list[list[str]] = []
    for r in report.rows:
        row = [paint(r.status), r.name, _side(r.source_shape, r.source_dtype), _side(r.target_shape, r.target_dtype)]
        if report.values:
            row += [_num(r.max_abs_diff), _num(r.rel_change)]
        rows.append(row)
    if report.values:
        headers += ["max |diff|", "rel change"]
    return table(rows, headers)


def _side(shape: tuple[int, ...] | None, dtype: str | None) -> str:
    return "-" if shape is None else f"{shape_str(shape)} {dtype}"


def _statuses(statuses: dict[str, int]) -> str:
    return ", ".join(f"{n} {s}" for s, n in statuses.items())


def _share(part: int, whole: int) -> str:
    """A percentage that never rounds a gap away: 10 missing elements of 138M read 99.9928%, not 100.0%."""
    share = part / whole if whole else 1.0
    for digits in (1, 2, 3, 4, 6):
        text = f"{share:.{digits}%}"
        if (float(text[:-1]) == 100.0) == (part == whole) and (float(text[:-1]) == 0.0) == (part == 0):
            return text
    return f"{share:.6%}"


def _share_of(share: float) -> str:
    return f"{share:.0%}" if share == 0 or share >= 0.01 else f"{share:.2%}"


def _num(value: float | None) -> str:
    return "" if value is None else f"{value:.3g}"


COMMANDS = [diff]
