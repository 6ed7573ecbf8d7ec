"""The ``ckpt`` command line: parse, call one library function, render. Errors are mapped here.

Exit codes: 0 clean, 1 findings (differences, unsafe files, failed checks), 2 usage or input
errors, 3 unexpected bugs (set CKPT_DEBUG=1 for the traceback).
"""

from __future__ import annotations

import os
import sys
from typing import Any

import click

from . import __version__
from .errors import CkptError

EXIT_OK, EXIT_FINDINGS, EXIT_INPUT, EXIT_BUG = 0, 1, 2, 3


class _Group(click.Group):
    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except CkptError as exc:
            if os.environ.get("CKPT_DEBUG"):
                raise
            message = str(exc)
            if exc.hint:
                message += f" ({exc.hint})"
            click.echo(f"ckpt: error: {message}", err=True)
            ctx.exit(exc.exit_code)
        except (click.exceptions.Exit, click.ClickException, click.Abort):
            raise
        except KeyboardInterrupt:
            click.echo("ckpt: interrupted", err=True)
            ctx.exit(130)
        except BrokenPipeError:
            ctx.exit(EXIT_OK)
        except Exception as exc:  # noqa: BLE001 - the one place bugs become a message
            if os.environ.get("CKPT_DEBUG"):
                raise
            click.echo(
                f"ckpt: internal error: {type(exc).__name__}: {exc} (a bug in ckpt; rerun with CKPT_DEBUG=1 "
                "for the traceback and report it)",
                err=True,
            )
            ctx.exit(EXIT_BUG)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="ckpt")
def main() -> None:
    """Inspect, diff, migrate, fine-tune-check and scan PyTorch checkpoints, safely.

    Exit codes: 0 clean, 1 findings (differences, unsafe files, failed checks),
    2 usage or input errors, 3 internal errors (CKPT_DEBUG=1 shows the traceback).
    """


def _register() -> None:
    from .commands import inspect_cmd

    main.add_command(inspect_cmd.inspect)
    for name in ("diff_cmd", "migrate_cmd", "finetune_cmd", "scan_cmd"):
        try:
            module = __import__(f"ckpt_tool.commands.{name}", fromlist=["COMMANDS"])
        except ModuleNotFoundError as exc:
            if exc.name != f"ckpt_tool.commands.{name}":
                raise
            continue
        for command in module.COMMANDS:
            main.add_command(command)


_register()

if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
