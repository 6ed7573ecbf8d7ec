"""``ckpt inspect``: parse, call :func:`inspect_checkpoint`, render."""

from __future__ import annotations

import json
import sys
from typing import TYPE_CHECKING

import click

from ..checkpoint import BUFFER_NAMES
from ..inspect import FOLD_ROWS
from ..render import echo_json, human_bytes, human_count, json_option, page, progress_bar, shape_str, table
from .options import key_option, pager_option

if TYPE_CHECKING:
    from ..inspect import InspectReport, TensorRow


@click.command()
@click.argument("path", type=click.Path(dir_okay=True))
@key_option(
    help="Nested state dict to show (model, state_dict, ckpt/ema; components split by / or .); by "
    "default the obvious one."
)
@click.option("--depth", type=int, help="Roll tensors up by module prefix of N components.")
@click.option("--filter", "filter_", metavar="REGEX", help="Only keys matching this regular expression.")
@click.option("--stats", is_flag=True, help="Read values (streamed) and add min/max/mean/std, NaN/Inf counts.")
@click.option(
    "--all",
    "all_rows",
    is_flag=True,
    help=f"Print every tensor's row; above {FOLD_ROWS:,} rows the table is folded by module unless this is given.",
)
@pager_option
@json_option
def inspect(
    path: str,
    key: str | None,
    depth: int | None,
    filter_: str | None,
    stats: bool,
    all_rows: bool,
    no_pager: bool,
    as_json: bool,
) -> None:
    """Describe a checkpoint without loading it: format, tensors, where the weights are.

    Reads .pth/.pt/.bin/.ckpt (torch zip and legacy), TorchScript, .safetensors, sharded
    sets (*.index.json or a directory) and plain pickles. Nothing in the file is executed
    and, without --stats, no tensor bytes are read.

    Exit codes: 0 described, 1 --stats found NaN/Inf values, 2 unreadable input or bad arguments.
    """
    from ..inspect import inspect_checkpoint

    with progress_bar("reading values", enabled=stats) as progress:
        report = inspect_checkpoint(
            path,
            key,
            depth=depth,
            filter=filter_,
            stats=stats,
            progress=progress,
            fold_over=None if all_rows or as_json else FOLD_ROWS,
        )
    if as_json:
        echo_json(report)
    else:
        page(_render(report, all_rows), enabled=not no_pager)
    if report.nonfinite:
        sys.exit(1)


def _render(r: InspectReport, all_rows: bool = False) -> str:
    """The summary and the table, as one text (paged as a whole on a terminal)."""
    from ..inspect import fold

    summary = [
        ("file", r.path if len(r.files) <= 1 else f"{r.path} ({len(r.files)} shards)"),
        ("format", r.format),
        ("size", f"{human_bytes(r.file_size)} ({r.file_size:,} bytes)"),
        ("state dict", _where(r)),
        ("tensors", str(r.tensors)),
        # values, not parameters: buffers are tensors too; the part known to be buffers is said
        ("values", _count(r.parameters)),
        *(
            (
                (
                    "in buffers",
                    f"{_count(r.buffers)} ({', '.join(BUFFER_NAMES)}); {_count(r.parameters - r.buffers)} in the others",
                ),
            )
            if r.buffers
            else ()
        ),
        ("bytes by dtype", ", ".join(f"{d} {human_bytes(n)}" for d, n in r.bytes_by_dtype.items()) or "-"),
        ("common prefix", r.common_prefix or "(none)"),
    ]
    if r.shared_storages:
        summary.append(("shared storage", "; ".join(", ".join(g) for g in r.shared_storages)))
    for name, value in r.extras.items():
        summary.append((f"extra: {name}", _short(value)))
    if r.placeholders:
        summary.append(
            ("objects (inert)", ", ".join(r.placeholders[:12]) + (" ..." if len(r.placeholders) > 12 else ""))
        )
    for name, value in r.metadata.items():
        summary.append((f"metadata: {name}", _short(value)))
    for name, value in r.objects.items():
        summary.append((f"entry: {name}", _short(value)))
    width = max(len(k) for k, _ in summary)
    out = [f"{k:<{width}}  {v}" for k, v in summary]
    out += [f"note: {n}" for n in r.notes]
    modules = r.modules
    if r.depth is None and len(r.rows) > FOLD_ROWS and not all_rows:  # a report made without fold_over
        how, modules = fold(r.rows)
    else:
        how = r.folded
    if how:
        out.append(
            f"note: {sum(m.tensors for m in modules):,} tensors folded into {len(modules):,} rows ({how}); "
            "--all prints every tensor, --depth N rolls up by N components"
        )
    out.append("")
    if modules or r.depth is not None or how:
        out.append(
            table(
                (
                    (m.name or "(top)", m.tensors, f"{m.parameters:,}", human_bytes(m.nbytes), ",".join(m.dtypes))
                    for m in modules
                ),
                ["module", "tensors", "values", "size", "dtypes"],
                ["left", "right", "right", "right", "left"],
            )
        )
        return "\n".join(out + _optimizer_lines(r))
    out.append(_tensor_table(r.rows))
    out += _optimizer_lines(r)
    if r.attributes:
        out.append("")
        out.append("TorchScript attributes (tensors that are neither parameters nor buffers; not in state_dict()):")
        out.append(_tensor_table(r.attributes))
    return "\n".join(out)


def _optimizer_lines(r: InspectReport) -> list[str]:
    """Each optimizer state: its param groups with hyper-parameters, then the state per parameter id."""
    out: list[str] = []
    for o in r.optimizers:
        mapped = f"ids mapped by {o.mapped_by}" if o.mapped_by else f"ids not mapped to parameters: {o.unmapped}"
        out += [
            "",
            f"optimizer {o.path}: {o.kind}, {len(o.groups)} param group{'s' * (len(o.groups) != 1)}, "
            f"{len(o.state)} parameters with state, {o.tensors} tensors ({human_bytes(o.tensor_bytes)}); {mapped}",
        ]
        names = sorted({k for g in o.groups for k in g.hyper})
        out.append(
            table(
                ([g.index, g.params, *(_short(g.hyper.get(k, "-")) for k in names)] for g in o.groups),
                ["group", "params", *names],
                ["right", "right", *(["left"] * len(names))],
            )
        )
        rows = [
            (
                s.id,
                s.parameter or "?",
                s.group,
                ", ".join(f"{n} {shape_str(sh)} {dt}" for n, sh, dt in s.tensors)
                + "".join(f", {n}={_short(v)}" for n, v in s.values.items()),
            )
            for s in o.state
        ]
        out.append(table(rows, ["id", "parameter", "group", "state"], ["right", "left", "right", "left"]))
    return out


def _tensor_table(rows_in: tuple[TensorRow, ...]) -> str:
    headers = ["name", "shape", "dtype", "values", "size"]
    align = ["left", "left", "left", "right", "right"]
    composite = any(row.kind != "dense" or row.detail for row in rows_in)
    if composite:
        headers.append("kind")
        align.append("left")
    if any(row.stats for row in rows_in):
        headers += ["min", "max", "mean", "std", "nan", "inf"]
        align += ["right"] * 6
    rows = []
    for row in rows_in:
        name = row.name + ("  (= " + ", ".join(row.shared_with) + ")" if row.shared_with else "")
        line = [name, shape_str(row.shape), row.dtype, f"{row.parameters:,}", human_bytes(row.nbytes)]
        if composite:
            line.append(f"{row.kind}: {row.detail}" if row.detail else row.kind)
        if row.stats is not None:
            s = row.stats
            line += [_num(s.min), _num(s.max), _num(s.mean), _num(s.std), str(s.nan), str(s.inf)]
        elif "std" in headers:
            line += ["-"] * 6
        rows.append(line)
    return table(rows, headers, align)


def _where(r: InspectReport) -> str:
    if r.state_path is None:
        return "(none found)"
    where = "<top level>" if r.state_path == "" else repr(r.state_path)
    if len(r.candidates) > 1:
        where += "; candidates: " + ", ".join(f"{c.path or '<top level>'} ({c.tensors} tensors)" for c in r.candidates)
    return where


def _short(value: object) -> str:
    text = value if isinstance(value, str) else json.dumps(value, default=str)
    return text if len(text) <= 100 else text[:97] + "..."


def _count(n: int) -> str:
    short, full = human_count(n), f"{n:,}"
    return full if short.replace(",", "") == str(n) else f"{short} ({full})"


def _num(v: float | None) -> str:
    return "-" if v is None else f"{v:.4g}"


COMMANDS = [inspect]
