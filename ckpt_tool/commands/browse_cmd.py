"""``ckpt browse``: look through any checkpoint in the terminal (and diff it) with a Textual interface."""

from __future__ import annotations

import importlib.util
import os
import sys

import click

from ..errors import CkptError, UsageError
from ..render import echo
from .options import arch_arg_option, arch_option, key_option, no_cache_option, target_key_option

TUI_MISSING = "ckpt browse needs Textual: pip install 'ckpt-tool[tui]'"


@click.command()
@click.argument("path", type=click.Path(dir_okay=True))
@click.argument("target", required=False, type=click.Path(dir_okay=True))
@arch_option
@arch_arg_option
@key_option(help="Nested state dict of PATH to show (model, state_dict, ckpt/ema).")
@target_key_option
@no_cache_option
def browse(
    path: str,
    target: str | None,
    arch: str | None,
    arch_args: tuple[str, ...],
    key: str | None,
    target_key: str | None,
    no_cache: bool,
) -> None:
    """Browse a checkpoint interactively: module tree, tensors, layout, values, safety verdict.

    Opens anything `ckpt inspect` reads, header-only; nothing in the file runs and nothing is
    written. With a TARGET checkpoint or --arch, the tree is coloured by what `ckpt diff`
    finds (missing, unexpected, shape or dtype mismatch) and `p` shows the fix plan as a
    `ckpt migrate` command (`m` there quits and prints it).

    \b
    Keys: arrows/enter move and open, tab switches pane, / filter (text or regex),
    s sort (file, name, size, params), v values of the tensor, i summary,
    d differences only, p fix plan, q quit.

    Needs the tui extra: pip install 'ckpt-tool[tui]'.

    Exit codes: 0 closed, 2 usage or input errors (bad file, no terminal, Textual missing).
    """
    if importlib.util.find_spec("textual") is None:
        raise CkptError(TUI_MISSING)
    from ..browse.view import load

    # the input's errors first, whatever the terminal
    data = load(path, target, arch=arch, arch_args=arch_args, key=key, target_key=target_key, use_cache=not no_cache)
    if not (sys.stdin.isatty() and sys.stdout.isatty()):
        raise UsageError("ckpt browse needs a terminal (for a listing to pipe, use `ckpt inspect` or `ckpt diff`)")
    from ..browse.app import BrowseApp
    from ..render import color_on

    if not color_on():
        os.environ["NO_COLOR"] = "1"  # ckpt --no-color: Textual draws in monochrome
    command = BrowseApp(data).run()
    if command:
        echo(command)


COMMANDS = [browse]
