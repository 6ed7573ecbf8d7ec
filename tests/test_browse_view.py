"""The browser's view-model: summary, lazy module tree, rows, filters, sorts and diff statuses (no Textual)."""

from __future__ import annotations

import pytest
from browse_helpers import write_checkpoints

from ckpt_tool.browse.view import MAX_ROWS, ModuleTree, compile_filter, load, natural_key
from ckpt_tool.diff import diff
from ckpt_tool.errors import UsageError
from ckpt_tool.reader import open_checkpoint


@pytest.fixture(scope="session")
def paths(tmp_path_factory, torch):
    return write_checkpoints(str(tmp_path_factory.mktemp("browse")))


def test_summary_names_the_state_dict_its_candidates_and_extras(paths):
    s = load(paths["source"]).summary
    assert (s.format, s.state_path, s.state_dict) == ("torch-zip", "model", "'model'")
    assert [(c.path, c.tensors) for c in s.candidates] == [("model", 51), ("ema", 4)]
    assert (s.extras["epoch"], s.extras["run"], sorted(s.extras)) == (7, "baseline", ["ema", "epoch", "run"])
    ckpt = open_checkpoint(paths["source"])
    assert (s.tensors, s.parameters, s.tensor_bytes) == (len(ckpt.tensors), ckpt.parameters, ckpt.tensor_bytes)
    assert load(paths["safetensors"]).summary.metadata == {"format": "pt"}


def test_tree_figures_add_up_and_children_keep_file_order(paths):
    tree = ModuleTree(load(paths["source"]))
    root = tree.root()
    ckpt = open_checkpoint(paths["source"])
    assert (root.tensors, root.parameters, root.nbytes) == (51, ckpt.parameters, ckpt.tensor_bytes)
    top = tree.children("")
    assert [m.name for m in top] == ["embed", "blocks", "head"]  # "proj" is a tensor of the root, not a module
    assert sum(m.tensors for m in top) == 50
    blocks = tree.children("blocks")
    assert [m.path for m in blocks[:3]] == ["blocks.0", "blocks.1", "blocks.2"] and len(blocks) == 12
    assert blocks[0].has_children and not tree.children("blocks.0")[0].has_children  # blocks.0.fc holds tensors
    fc = tree.children("blocks.0")[0]
    assert (fc.path, fc.tensors, fc.parameters, fc.nbytes) == ("blocks.0.fc", 2, 72, 288)


def test_tree_groups_a_module_only_when_it_is_opened(paths):
    tree = ModuleTree(load(paths["source"]))
    tree.children("")
    assert set(tree._children) == {""}
    tree.children("blocks")
    assert set(tree._children) == {"", "blocks"}
    assert "blocks.3.fc" not in tree._members


def test_rows_of_a_module_with_layout_and_shared_storage(paths):
    tree = ModuleTree(load(paths["source"]))
    rows, total = tree.rows("")
    assert total == 51 and [e.key for e in rows[:2]] == ["proj", "embed.weight"]
    by_key = {e.key: e for e in rows}
    assert by_key["head.weight"].shared_with == ("embed.weight",)
    assert by_key["embed.weight"].shared_with == ("head.weight",)
    proj = by_key["proj"]
    assert (proj.shape, proj.ref.stride, proj.ref.is_contiguous) == ((6, 4), (1, 6), False)
    rows, total = tree.rows("blocks", limit=3)
    assert (len(rows), total) == (3, 48) and MAX_ROWS >= 51


def test_sorts_by_name_size_and_parameters(paths):
    tree = ModuleTree(load(paths["source"]))
    assert [m.name for m in tree.with_sort("name").children("blocks")][:4] == ["0", "1", "2", "3"]
    assert [m.name for m in tree.with_sort("name").children("")] == ["blocks", "embed", "head"]
    by_size = tree.with_sort("size").children("")
    assert [m.nbytes for m in by_size] == sorted((m.nbytes for m in by_size), reverse=True)
    assert [e.key for e in tree.with_sort("params").rows("")[0][:1]] == ["embed.weight"]
    names = [e.key for e in tree.with_sort("name").rows("blocks")[0]]
    assert names.index("blocks.2.fc.bias") < names.index("blocks.10.fc.bias")
    assert natural_key("blocks.2") < natural_key("blocks.10")
    with pytest.raises(UsageError):
        tree.with_sort("colour")


def test_filter_by_text_or_regex(paths):
    tree = ModuleTree(load(paths["source"]))
    fc = tree.with_selection(tree.select(r"blocks\.1\d?\.fc"))
    assert fc.root().tensors == 3 * 2  # blocks.1, .10, .11
    assert [m.name for m in fc.children("")] == ["blocks"]
    assert ModuleTree(load(paths["source"])).select("weight[") == []  # not a regex: matched literally, nothing
    assert compile_filter("a[").pattern == r"a\["
    assert fc.rows("blocks.1")[1] == 2


def test_diff_mode_statuses_come_from_the_diff_engine(paths):
    data = load(paths["source"], paths["target"])
    report = diff(open_checkpoint(paths["source"]), open_checkpoint(paths["target"]))
    assert data.report is not None and data.report.counts == report.counts
    tree = ModuleTree(data)
    statuses = {tree.keys[i]: tree.statuses[i] for i in tree.selection}
    assert statuses == {k.key: k.status for k in report.keys}
    assert statuses["blocks.12.fc.weight"] == "missing" and statuses["embed.weight"] == "shape"
    assert statuses["blocks.0.norm.bias"] == "unexpected" and statuses["blocks.1.fc.bias"] == "dtype"
    blocks = {m.name: m for m in tree.children("blocks")}
    assert blocks["12"].status == "missing" and blocks["0"].status == "unexpected"
    assert blocks["1"].status == "dtype" and blocks["2"].status == "matched" and blocks["2"].differences == 0
    assert tree.root().status == "missing" and tree.root().differences == 4
    missing = tree.rows("blocks.12")[0][0]
    assert (missing.ref, missing.shape, missing.target_shape) == (None, (8, 8), (8, 8))
    only = tree.with_selection(tree.select(differences_only=True))
    assert sorted(only.keys[i] for i in only.selection) == sorted(
        ["blocks.12.fc.weight", "embed.weight", "blocks.0.norm.bias", "blocks.1.fc.bias"]
    )
    assert data.files == (paths["source"], paths["target"])


def test_bad_combinations_are_usage_errors(paths):
    with pytest.raises(UsageError, match="not both"):
        load(paths["source"], paths["target"], arch="resnet18")
    with pytest.raises(UsageError, match="--arch-arg needs --arch"):
        load(paths["source"], arch_args=["num_classes=3"])
    with pytest.raises(UsageError, match="--target-key needs"):
        load(paths["source"], target_key="model")
