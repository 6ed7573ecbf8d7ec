"""``ckpt scan`` and ``ckpt validate``: unsafe, broken and off-policy model files, for people and pre-commit."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING

import click

from .. import __version__
from ..errors import EXIT_FINDINGS, UsageError
from ..errors import EXIT_OK as EXIT_CLEAN
from ..render import dumps, echo, json_option, paint, plain_table
from .options import allow_option

if TYPE_CHECKING:  # the reports a renderer reads: typed, so a renamed field fails mypy
    from ..scan.report import ScanReport
    from ..validate import ValidateReport

_SHOWN_NAMES = 2


@click.command()
@click.argument("paths", nargs=-1, required=True, type=click.Path())
@allow_option
@click.option(
    "--format",
    "output",
    type=click.Choice(["table", "json", "sarif"]),
    default="table",
    show_default=True,
    help="Output format; sarif is SARIF 2.1.0 for code-scanning dashboards.",
)
@click.option(
    "--globals",
    "show_globals",
    is_flag=True,
    help="In the table output, also list every global and call each file names (safe ones too).",
)
@json_option
def scan(paths: tuple[str, ...], allow: tuple[str, ...], output: str, show_globals: bool, as_json: bool) -> None:
    """Statically scan model files for code that would run when they are loaded. Nothing is executed.

    PATHS are files or directories (walked recursively; a file counts as a model file by its
    extension or its content). Every pickle stream is read: a torch zip's data.pkl and every other
    pickle in the archive, all pickles of the legacy format, plain pickles under any name.
    safetensors files are checked structurally.

    \b
    Verdicts:
      safe        only what torch's weights_only loader allows, plus inert data classes
      unsafe      a known way to run code (os, subprocess, eval, getattr, pickle.loads, ...)
                  or a global that cannot be resolved statically
      suspicious  a global not on the allow list (a full pickled model names its own classes)
      broken      the file cannot be parsed, or its structure contradicts itself
      skipped     a git-lfs pointer: the real file was not fetched

    \b
    Exit codes:
      0  every file is safe (or a skipped git-lfs pointer)
      1  a file is unsafe, suspicious or broken
      2  usage or input errors (missing path, bad --allow)
    """
    from ..scan import sarif
    from ..scan import scan as scan_paths

    if as_json and output != "table":
        raise UsageError("--json and --format are exclusive (--json is --format json)")
    report = scan_paths(paths, allow)
    if output == "sarif":
        echo(json.dumps(sarif(report, __version__), indent=2, sort_keys=True))
    elif as_json or output == "json":
        echo(dumps(report))
    else:
        _render_scan(report, show_globals)
    raise click.exceptions.Exit(EXIT_CLEAN if report.ok else EXIT_FINDINGS)


def _render_scan(report: ScanReport, show_globals: bool = False) -> None:
    from ..scan import WEIGHTS_ONLY_NOTE  # imported by the scan that made the report

    # a safe file's notes that change what its user does: torch reads it otherwise (walkers), or refuses it
    torch_notes = ("torch's reading", WEIGHTS_ONLY_NOTE)
    rows = []
    for f in report.files:
        names = list(dict.fromkeys(x.name for x in f.findings))
        shown = ", ".join(names[:_SHOWN_NAMES]) + (
            f" +{len(names) - _SHOWN_NAMES} more" if len(names) > _SHOWN_NAMES else ""
        )
        rows.append((f.path, f.format, paint(f.verdict), shown or "-"))
    echo(plain_table(rows, ["file", "format", "verdict", "offending"]))  # no tabulate import: hooks run often
    for f in report.files:
        shown_notes = list(f.notes) if f.verdict == "skipped" else [n for n in f.notes if n.startswith(torch_notes)]
        if not f.findings and f.verdict != "skipped" and not show_globals and not shown_notes:
            continue
        echo()
        echo(f"{f.path}: {paint(f.verdict)}")
        if show_globals:
            echo(f"  streams: {', '.join(f.streams) or '-'}")
            echo(f"  globals: {', '.join(f.globals) or '-'}")
            echo(f"  calls:   {', '.join(f.calls) or '-'}")
        for note_text in shown_notes:
            echo(f"  note: {note_text}")
        for x in f.findings:
            where = " ".join(
                p
                for p in (
                    x.opcode,
                    f"in {x.stream}" if x.stream else "",
                    f"at byte {x.position}" if x.position is not None else "",
                )
                if p
            )
            echo(f"  {paint(f'{x.severity:<10}', x.severity)} {x.name}{f' ({where})' if where else ''}: {x.reason}")
    counts = report.counts()
    summary = ", ".join(
        f"{counts[v]} {v}" for v in ("unsafe", "broken", "suspicious", "safe", "skipped") if v in counts
    )
    echo()
    echo(f"{len(report.files)} file{'s' if len(report.files) != 1 else ''} scanned: {summary or 'none'}")


@click.command()
@click.argument("paths", nargs=-1, required=True, type=click.Path())
@allow_option
@json_option
def validate(paths: tuple[str, ...], allow: tuple[str, ...], as_json: bool) -> None:
    """Check model files before they are committed: scan, loadability and the project's policies.

    Every file is scanned (as `ckpt scan`) and opened with the safe reader (every tensor
    description must be consistent with the file). A *.index.json checks its sharded set as a
    whole: every shard exists inside the directory, no key is in two shards, total_size matches.
    A git-lfs pointer passes with a note (lfs-pointers = "fail" makes it fail).

    \b
    Policies come from [tool.ckpt] in the repository's pyproject.toml:
      require-format = "safetensors"     max-size-mb = 200      no-nan-inf = true
      [tool.ckpt.arch]  "models/cls_*.safetensors" = "resnet18"
                        "models/det_*.pth" = { arch = "resnet50", args = { num_classes = 3 } }

    \b
    Exit codes:
      0  every file passes
      1  a check failed
      2  usage or input errors (missing path, bad [tool.ckpt])
    """
    from ..validate import validate as validate_paths

    report = validate_paths(paths, allow)
    if as_json:
        echo(dumps(report))
    else:
        _render_validate(report)
    raise click.exceptions.Exit(EXIT_CLEAN if report.ok else EXIT_FINDINGS)


def _render_validate(report: ValidateReport) -> None:
    rows = []
    for f in report.files:
        for i, c in enumerate(f.checks):
            rows.append((f.path if i == 0 else "", f.format if i == 0 else "", c.name, paint(c.status), c.message))
    echo(plain_table(rows, ["file", "format", "check", "status", "detail"]))
    failed = [f.path for f in report.files if not f.ok]
    echo()
    config = f" (policies from {report.config})" if report.config else ""
    echo(
        f"{len(report.files)} file{'s' if len(report.files) != 1 else ''} validated{config}: "
        + (paint(f"{len(failed)} failed", "fail") if failed else paint("all passed", "pass"))
    )


COMMANDS = [scan, validate]
