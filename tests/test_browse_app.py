"""``ckpt browse`` driven through Textual's own harness (``App.run_test`` and its pilot), and the command's errors."""

from __future__ import annotations

import asyncio
import functools
import hashlib
import os

import pytest
from browse_helpers import write_checkpoints
from click.testing import CliRunner

pytest.importorskip("textual")

from ckpt_tool.browse.app import BrowseApp, PlanScreen, SummaryScreen  # noqa: E402
from ckpt_tool.browse.view import load  # noqa: E402
from ckpt_tool.cli import main  # noqa: E402
from ckpt_tool.values import FileCache, tensor_stats  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
UNSAFE = os.path.join(ROOT, "fixtures", "malicious", "torch_zip_payload.pth")


@pytest.fixture(scope="session")
def paths(tmp_path_factory, torch):
    return write_checkpoints(str(tmp_path_factory.mktemp("browse_app")))


def sync(test):
    """Run an async pilot test in its own event loop (no asyncio plugin needed)."""

    @functools.wraps(test)
    def run(*args, **kwargs):
        return asyncio.run(test(*args, **kwargs))

    return run


async def _settle(app, pilot):
    await pilot.pause()
    await app.workers.wait_for_complete()
    await pilot.pause()


def _tree_lines(app):
    tree = app.query_one("#tree")
    return [str(n.label).split("  ")[0] for n in _walk(tree.root)]


def _walk(node):
    yield node
    for child in node.children:
        yield from _walk(child)


@sync
async def test_open_navigate_and_quit(paths):
    app = BrowseApp(load(paths["source"]))
    async with app.run_test(size=(80, 24)) as pilot:
        await _settle(app, pilot)
        table = app.query_one("#table")
        assert table.row_count == 51 and app.current == ""
        assert _tree_lines(app)[1:] == ["embed", "blocks", "head"]
        await pilot.press("down", "down")  # to blocks: the table follows the tree
        assert app.current == "blocks" and table.row_count == 48
        await pilot.press("enter")  # opens blocks: its twelve children appear
        assert "11" in _tree_lines(app)
        await pilot.press("down")
        assert app.current == "blocks.0" and table.row_count == 4
        await pilot.press("tab", "down")
        assert "blocks.0.fc.bias" in str(app.query_one("#details").render())
        await pilot.press("q")
    assert app.return_value is None


@sync
async def test_filter_then_escape(paths):
    app = BrowseApp(load(paths["source"]))
    async with app.run_test(size=(80, 24)) as pilot:
        await _settle(app, pilot)
        await pilot.press("slash", *r"norm\.bias")
        assert app.tree_data.root().tensors == 12 and app.query_one("#table").row_count == 12
        assert app.query_one("#tree").border_subtitle == "filter: norm\\.bias"
        await pilot.press("enter")  # keeps the filter, back to the tree
        assert app.focused is app.query_one("#tree") and app.tree_data.root().tensors == 12
        await pilot.press("escape")
        assert app.tree_data.root().tensors == 51 and app.pattern == ""


@sync
async def test_sort_cycles_and_reorders_the_tree(paths):
    app = BrowseApp(load(paths["source"]))
    async with app.run_test(size=(80, 24)) as pilot:
        await _settle(app, pilot)
        await pilot.press("s")
        assert app.tree_data.sort == "name" and _tree_lines(app)[1:] == ["blocks", "embed", "head"]
        await pilot.press("s")
        assert app.tree_data.sort == "size" and "sort: size" in app.query_one("#tree").border_title


@sync
async def test_values_are_read_in_a_worker_with_the_library_stats(paths):
    data = load(paths["source"])
    app = BrowseApp(data, scan=False)
    async with app.run_test(size=(80, 24)) as pilot:
        await _settle(app, pilot)
        await pilot.press("tab", "down", "v")  # embed.weight
        await _settle(app, pilot)
        with FileCache() as files:
            expected = tensor_stats(data.checkpoint.tensors["embed.weight"], files)
        assert app.stats["embed.weight"] == expected
        assert f"mean {expected.mean:.4g}" in str(app.query_one("#details").render())


@sync
async def test_header_carries_the_scan_verdict(paths):
    app = BrowseApp(load(UNSAFE))
    async with app.run_test(size=(80, 24)) as pilot:
        await _settle(app, pilot)
        header = app.query_one("#header")
        assert header.has_class("-unsafe") and "scan: UNSAFE (posix.system)" in str(header.render())
        await pilot.press("i")
        assert isinstance(app.screen, SummaryScreen)
        assert "posix.system" in str(app.screen.query_one("#summary-text").render())
        await pilot.press("escape")
        assert not isinstance(app.screen, SummaryScreen)
    safe = BrowseApp(load(paths["source"]))
    async with safe.run_test(size=(80, 24)) as pilot:
        await _settle(safe, pilot)
        assert not safe.query_one("#header").has_class("-unsafe")
        assert "scan: safe" in str(safe.query_one("#header").render())


@sync
async def test_diff_mode_toggles_differences_and_prints_the_plan(paths):
    data = load(paths["source"], paths["target"])
    app = BrowseApp(data)
    async with app.run_test(size=(80, 24)) as pilot:
        await _settle(app, pilot)
        assert "1 missing 1 unexpected 1 shape 1 dtype · fails a strict load" in str(app.query_one("#header").render())
        await pilot.press("d")
        assert app.differences_only and app.tree_data.root().tensors == 4
        assert app.query_one("#table").row_count == 4
        await pilot.press("d")
        assert app.tree_data.root().tensors == 52
        await pilot.press("p")
        assert isinstance(app.screen, PlanScreen)
        text = str(app.screen.query_one("#plan-text").render())
        assert "--drop blocks.0.norm.bias" in data.report.plan.command and data.report.plan.command in text
        assert "only an --arch target can fill" in text  # a checkpoint target has no values for the missing key
        await pilot.press("escape", "q")


@sync
async def test_plan_screen_returns_the_migrate_command(paths, tmp_path):
    from browse_helpers import build_net
    from safetensors.torch import save_file

    prefixed = str(tmp_path / "dp.safetensors")
    save_file(
        {"module." + k: v.contiguous() for k, v in build_net().state_dict().items() if k != "head.weight"}, prefixed
    )
    data = load(prefixed, paths["safetensors"])
    app = BrowseApp(data, scan=False)
    async with app.run_test(size=(80, 24)) as pilot:
        await _settle(app, pilot)
        await pilot.press("p")
        assert "--strip-prefix module." in data.report.plan.command
        await pilot.press("m")
    assert app.return_value == data.report.plan.command


@sync
async def test_browsing_never_writes(paths):
    before = {p: (os.stat(p).st_mtime_ns, hashlib.sha256(open(p, "rb").read()).hexdigest()) for p in paths.values()}
    app = BrowseApp(load(paths["source"], paths["target"]))
    async with app.run_test(size=(80, 24)) as pilot:
        await _settle(app, pilot)
        await pilot.press("tab", "v", "d", "s", "p", "escape", "q")
        await _settle(app, pilot)
    after = {p: (os.stat(p).st_mtime_ns, hashlib.sha256(open(p, "rb").read()).hexdigest()) for p in paths.values()}
    assert after == before


def test_command_without_textual_names_the_extra(paths, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "textual" else real(name, *a))
    result = CliRunner().invoke(main, ["browse", paths["source"]])
    assert result.exit_code == 2
    assert result.output == "ckpt: error: ckpt browse needs Textual: pip install 'ckpt-tool[tui]'\n"


def test_command_needs_a_terminal_and_a_readable_file(paths, tmp_path):
    result = CliRunner().invoke(main, ["browse", paths["source"]])
    assert result.exit_code == 2 and "needs a terminal" in result.output
    assert len(result.output.splitlines()) == 1


@sync
async def test_many_children_are_added_a_batch_at_a_time(tmp_path):
    import numpy as np
    from safetensors.numpy import save_file

    from ckpt_tool.browse.app import CHILD_BATCH, More

    path = str(tmp_path / "wide.safetensors")
    save_file({f"layers.{i}.w": np.zeros(2, np.float32) for i in range(2 * CHILD_BATCH + 50)}, path)
    app = BrowseApp(load(path), scan=False)
    async with app.run_test(size=(80, 24)) as pilot:
        await _settle(app, pilot)
        layers = app.query_one("#tree").root.children[0]
        assert layers.is_expanded and len(layers.children) == CHILD_BATCH + 1
        assert isinstance(layers.children[-1].data, More) and "250 more" in str(layers.children[-1].label)
        app.query_one("#tree").select_node(layers.children[-1])
        await pilot.pause()
        assert len(layers.children) == 2 * CHILD_BATCH + 1 and "50 more" in str(layers.children[-1].label)


def test_command_reports_a_bad_file_in_one_line(tmp_path):
    bad = tmp_path / "empty.pth"
    bad.write_bytes(b"")
    result = CliRunner().invoke(main, ["browse", str(bad)])
    assert (result.exit_code, result.output) == (2, f"ckpt: error: {bad}: file is empty\n")
    result = CliRunner().invoke(main, ["browse", str(bad), str(bad), "--arch", "resnet18"])
    assert result.exit_code == 2 and "not both" in result.output
