"""Snapshots of the rendered ``ckpt browse`` screen at 80x24 (pytest-textual-snapshot; --snapshot-update rewrites them).

The checkpoints are opened by relative names from their directory so that the screens hold no temp path.
"""

from __future__ import annotations

import os
import shutil

import pytest
from browse_helpers import write_checkpoints

pytest.importorskip("pytest_textual_snapshot")

from ckpt_tool.browse.app import BrowseApp  # noqa: E402
from ckpt_tool.browse.view import load  # noqa: E402

UNSAFE = os.path.join(
    os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "fixtures", "malicious", "torch_zip_payload.pth"
)


@pytest.fixture(scope="session")
def shots_dir(tmp_path_factory, torch):
    out = str(tmp_path_factory.mktemp("browse_shots"))
    write_checkpoints(out)
    shutil.copy(UNSAFE, os.path.join(out, "payload.pth"))
    return out


def _steps(*keys):
    async def run(pilot):
        await pilot.pause()
        await pilot.app.workers.wait_for_complete()
        await pilot.pause()
        for key in keys:
            await pilot.press(key)
            await pilot.app.workers.wait_for_complete()
            await pilot.pause()

    return run


def test_open(snap_compare, shots_dir, monkeypatch):
    monkeypatch.chdir(shots_dir)
    assert snap_compare(BrowseApp(load("train.pth")), run_before=_steps("down", "enter", "tab", "down", "v"))


def test_diff_differences_only(snap_compare, shots_dir, monkeypatch):
    monkeypatch.chdir(shots_dir)
    assert snap_compare(BrowseApp(load("train.pth", "target.pth")), run_before=_steps("d", "tab"))


def test_plan(snap_compare, shots_dir, monkeypatch):
    monkeypatch.chdir(shots_dir)
    assert snap_compare(BrowseApp(load("train.pth", "target.pth")), run_before=_steps("p"))


def test_unsafe_header(snap_compare, shots_dir, monkeypatch):
    monkeypatch.chdir(shots_dir)
    assert snap_compare(BrowseApp(load("payload.pth")), run_before=_steps())
