"""The ``ckpt`` command line: parse, call one library function, render. Errors are mapped here.

Exit codes: 0 clean, 1 findings (differences, unsafe files, failed checks), 2 usage or input
errors, 3 unexpected bugs (set CKPT_DEBUG=1 for the traceback).
"""

from __future__ import annotations

import importlib
import os
import sys
from typing import Any

import click

from . import __version__
from .errors import EXIT_BUG, EXIT_FINDINGS, EXIT_INPUT, EXIT_OK, CkptError

__all__ = ["EXIT_BUG", "EXIT_FINDINGS", "EXIT_INPUT", "EXIT_OK", "main"]


# command name -> the module under ckpt_tool.commands defining it; modules are imported only when
# their command runs (or for --help), so a pre-commit `ckpt scan` pays for no other command
COMMAND_MODULES = {
    "inspect": "inspect_cmd",
    "diff": "diff_cmd",
    "migrate": "migrate_cmd",
    "convert": "migrate_cmd",
    "finetune-check": "finetune_cmd",
    "scan": "scan_cmd",
    "validate": "scan_cmd",
    "browse": "browse_cmd",
}


class _Group(click.Group):
    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(COMMAND_MODULES)

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        module_name = COMMAND_MODULES.get(cmd_name)
        if module_name is None:
            return None
        module = importlib.import_module(f"ckpt_tool.commands.{module_name}")
        command: click.Command = next(c for c in module.COMMANDS if c.name == cmd_name)
        return command

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
@click.option(
    "--no-color",
    is_flag=True,
    help="Plain text even on a terminal (as NO_COLOR=1 does). Colour is never used in pipes or in JSON.",
)
def main(no_color: bool) -> None:
    """Inspect, diff, migrate, fine-tune-check and scan PyTorch checkpoints, safely.

    Exit codes: 0 clean, 1 findings (differences, unsafe files, failed checks),
    2 usage or input errors, 3 internal errors (CKPT_DEBUG=1 shows the traceback).
    """
    from .render import set_no_color

    set_no_color(no_color)


def run() -> Any:
    """The ``ckpt`` executable: :func:`main` in a process of its own, which lets bulk reads freeze what
    they build (``ckpt_tool.bulk.freeze_after_bulk``). Tests call :func:`main` through ``CliRunner``."""
    from .bulk import freeze_after_bulk

    freeze_after_bulk()
    return main()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(run())
