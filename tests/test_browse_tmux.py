"""``ckpt browse`` in a real terminal: tmux runs it at 80x24, keys are sent, the pane is read back.

Skipped where tmux is not installed (``apt-get install tmux``).
"""

from __future__ import annotations

import os
import shutil
import sys
import time

import pytest
from browse_helpers import write_checkpoints

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench"))
from terminal import Tmux  # noqa: E402 - the terminal bench_browse.py measures in

pytestmark = pytest.mark.skipif(shutil.which("tmux") is None, reason="tmux is not installed")
pytest.importorskip("textual")


@pytest.fixture()
def tmux(tmp_path_factory, torch):
    cwd = str(tmp_path_factory.mktemp("browse_tmux"))
    write_checkpoints(cwd)
    term = Tmux(cwd, poll=0.05)
    yield term, cwd
    term.close()


def test_browse_in_a_real_terminal_and_the_terminal_is_restored(tmux):
    term, cwd = tmux
    term.send("stty -g > before.txt; clear; echo READY-BEFORE", "Enter")
    term.wait_for("READY-BEFORE")
    term.send(
        f"{sys.executable} -m ckpt_tool.cli browse train.pth target.pth; echo EXIT=$?; stty -g > after.txt",
        literal=True,
    )
    term.send("Enter")
    screen = term.wait_for("train.pth", "sort: file", "scan: safe", "blocks")
    lines = screen.splitlines()
    assert len(lines) <= 24 and all(len(line) <= 80 for line in lines)
    assert "1 missing" in screen and "fails a strict load" in screen
    term.send("d")
    term.wait_for("diffs only", "(all) · 4 tensors")
    term.send("/")
    term.wait_for("filter keys: text or regular expression")
    term.send("norm", literal=True)
    term.wait_for("filter: norm")
    # a key sent right after Escape would read as Alt+key: wait for each Escape to land
    term.send("Escape")
    term.wait_gone("filter: norm")
    term.send("p")
    term.wait_for("fix plan", "--drop blocks.0.norm.bias")
    term.send("m")  # quit and print the command
    screen = term.wait_for("EXIT=0")
    assert "READY-BEFORE" in screen and "sort: file" not in screen  # the shell's screen is back, the browser gone
    assert "\nckpt migrate train.pth --key model --drop blocks.0.norm.bias -o train.fixed.pth\nEXIT=0" in screen
    time.sleep(0.2)
    with open(os.path.join(cwd, "before.txt")) as a, open(os.path.join(cwd, "after.txt")) as b:
        assert a.read() == b.read()  # terminal modes as they were
