"""Colour in the ordinary commands: on a terminal, never in pipes, with NO_COLOR or ``ckpt --no-color``,
never in JSON; colour codes never shift a table's columns.

CliRunner's stdout is no terminal: the ``terminal`` fixture makes render believe it is one.
"""

from __future__ import annotations

import os
import re

import pytest
from click.testing import CliRunner
from conftest import FIXTURES

from ckpt_tool.cli import main
from ckpt_tool.render import paint, plain_table, visible_len

UNSAFE = os.path.join(FIXTURES, "malicious", "torch_zip_payload.pth")
SAFE = os.path.join(FIXTURES, "tiny_cnn.pth")
ANSI = re.compile(r"\x1b\[[0-9;]*m")
RED_BOLD, RED, YELLOW, GREEN = "\x1b[1;31m", "\x1b[31m", "\x1b[33m", "\x1b[32m"


@pytest.fixture()
def terminal(monkeypatch):
    monkeypatch.delenv("NO_COLOR", raising=False)

    def on_a_terminal(on: bool) -> None:
        monkeypatch.setattr("ckpt_tool.render._stdout_is_terminal", lambda: on)

    return on_a_terminal


def _run(args, **env):
    return CliRunner().invoke(main, args, env={"NO_COLOR": None, **env})


def test_scan_verdicts_are_coloured_on_a_terminal_and_align(terminal):
    plain = _run(["scan", UNSAFE, SAFE])  # a pipe
    terminal(True)
    coloured = _run(["scan", UNSAFE, SAFE])
    assert plain.exit_code == coloured.exit_code == 1
    assert "\x1b[" not in plain.output
    assert f"{RED_BOLD}unsafe\x1b[0m" in coloured.output and f"{GREEN}safe\x1b[0m" in coloured.output
    assert f": {RED_BOLD}unsafe\x1b[0m" in coloured.output  # the per-file heading too
    assert ANSI.sub("", coloured.output) == plain.output  # same text, same columns


@pytest.mark.parametrize("how", [{"args": ["--no-color"]}, {"env": {"NO_COLOR": "1"}}])
def test_no_color_flag_and_variable_win_over_a_terminal(how, terminal):
    terminal(True)
    result = _run([*how.get("args", []), "scan", UNSAFE], **how.get("env", {}))
    assert result.exit_code == 1 and "unsafe" in result.output and "\x1b[" not in result.output


def test_json_is_never_coloured(terminal):
    plain = _run(["scan", UNSAFE, "--json"])
    terminal(True)
    coloured = _run(["scan", UNSAFE, "--json"])
    assert coloured.output == plain.output and "\x1b[" not in coloured.output
    assert (
        "\x1b[" not in _run(["diff", SAFE, os.path.join(FIXTURES, "tiny_cnn_dataparallel_nested.pth"), "--json"]).output
    )


def test_diff_statuses_and_verdict_are_coloured(terminal):
    nested = os.path.join(FIXTURES, "tiny_cnn_dataparallel_nested.pth")
    plain = _run(["diff", nested, SAFE])
    terminal(True)
    coloured = _run(["diff", nested, SAFE])
    assert coloured.exit_code == plain.exit_code == 1
    assert f"{YELLOW}unexpected\x1b[0m" in coloured.output and f"{RED}missing\x1b[0m" in coloured.output
    assert f"{RED_BOLD}would not load strictly.\x1b[0m" in coloured.output
    assert ANSI.sub("", coloured.output) == plain.output
    same = _run(["diff", SAFE, SAFE])
    assert f"{GREEN}loads strictly: load_state_dict(strict=True) would succeed\x1b[0m" in same.output


def test_validate_pass_and_fail_are_coloured(terminal):
    terminal(True)
    result = _run(["validate", SAFE, UNSAFE])
    assert result.exit_code == 1
    assert f"{GREEN}pass\x1b[0m" in result.output and f"{RED_BOLD}fail\x1b[0m" in result.output
    assert f"{RED_BOLD}1 failed\x1b[0m" in result.output


def test_paint_and_widths(terminal, monkeypatch):
    assert paint("PASS") == "PASS"  # pytest's stdout is captured: no terminal
    terminal(True)
    assert paint("PASS") == f"{GREEN}PASS\x1b[0m" and paint("layer1") == "layer1"  # only status words
    assert paint("2 failed", "fail") == f"{RED_BOLD}2 failed\x1b[0m" and visible_len(paint("unsafe")) == 6
    monkeypatch.setenv("NO_COLOR", "")
    assert paint("PASS") != "PASS"  # an empty NO_COLOR does not count (no-color.org)
    table = plain_table([[paint("unsafe"), "x"], ["safe", "y"]], ["verdict", "name"])
    assert ANSI.sub("", table) == plain_table([["unsafe", "x"], ["safe", "y"]], ["verdict", "name"])


def test_no_color_lasts_one_invocation(terminal):
    terminal(True)
    assert "\x1b[" not in _run(["--no-color", "scan", UNSAFE]).output
    assert "\x1b[" in _run(["scan", UNSAFE]).output
