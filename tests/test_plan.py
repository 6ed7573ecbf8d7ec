"""Plans and the pure state -> state operations (no tensor bytes, no torch)."""

from __future__ import annotations

import json
import os

import pytest

from ckpt_tool.arch import TargetTensor
from ckpt_tool.checkpoint import TensorRef, contiguous_strides
from ckpt_tool.errors import InputError, UsageError
from ckpt_tool.plan import (
    Operation,
    Plan,
    apply,
    initial_state,
    load_mapping,
    load_plan,
    operation,
    parse_rename,
    plan_from_json,
    save_plan,
)

pytestmark = pytest.mark.torchfree  # CI runs these in a core-only environment too


def ref(key: str, shape: tuple[int, ...] = (2, 3), dtype: str = "float32", storage: str | None = None) -> TensorRef:
    return TensorRef(key, dtype, shape, contiguous_strides(shape), storage or f"f#{key}", 0, 24, 100, "f")


def state(*keys: str, **shapes: tuple[int, ...]):
    refs = {k: ref(k) for k in keys}
    refs.update({k.replace("__", "."): ref(k.replace("__", "."), s) for k, s in shapes.items()})
    return initial_state(refs)


def run(st, *ops, target=None):
    return apply(list(ops), st, target)


def test_drop_is_module_path_not_string_prefix():
    st = state("classifier.6.weight", "classifier.6.bias", "classifier.60.weight", "classifier.6")
    out = run(st, operation("drop", prefix="classifier.6"))
    assert list(out.state) == ["classifier.60.weight"]
    assert out.steps[0].dropped == ("classifier.6.weight", "classifier.6.bias", "classifier.6")
    # a trailing dot means the same module
    assert list(run(st, operation("drop", prefix="classifier.6.")).state) == ["classifier.60.weight"]


def test_keep_and_exclude_use_search():
    st = state("features.0.weight", "features.0.bias", "fc.weight")
    assert list(run(st, operation("keep", pattern=r"^features\.")).state) == ["features.0.weight", "features.0.bias"]
    assert list(run(st, operation("exclude", pattern=r"bias$")).state) == ["features.0.weight", "fc.weight"]


def test_rename_with_groups_and_order_of_operations():
    st = state("layer1.conv.weight", "fc.weight")
    out = run(
        st,
        operation("rename", pattern=r"^layer(\d)\.", replacement=r"block\1."),
        operation("rename", pattern=r"^fc\.", replacement="head."),
    )
    assert list(out.state) == ["block1.conv.weight", "head.weight"]
    assert out.steps[0].renamed == (("layer1.conv.weight", "block1.conv.weight"),)
    assert out.state["head.weight"].origin == "fc.weight"  # values still come from the old key


def test_rename_that_merges_two_keys_is_an_error():
    st = state("a.weight", "b.weight")
    with pytest.raises(UsageError, match="maps both 'a.weight' and 'b.weight' to 'x.weight'"):
        run(st, operation("rename", pattern=r"^[ab]\.", replacement="x."))


def test_rename_onto_an_untouched_key_is_an_error():
    with pytest.raises(UsageError, match="maps both"):
        run(state("a", "b"), operation("rename", pattern="^a$", replacement="b"))


def test_swapping_two_names_is_allowed():
    out = run(state("a", "b"), operation("map", mapping={"a": "b", "b": "a"}))
    assert [(k, e.origin) for k, e in out.state.items()] == [("b", "a"), ("a", "b")]


def test_rename_to_empty_key_is_an_error():
    with pytest.raises(UsageError, match="empty key"):
        run(state("fc"), operation("rename", pattern="fc", replacement=""))


def test_strip_and_add_prefix():
    st = state("module.fc.weight", "module.fc.bias", "other")
    out = run(st, operation("strip_prefix", prefix="module."), operation("add_prefix", prefix="backbone."))
    assert list(out.state) == ["backbone.fc.weight", "backbone.fc.bias", "backbone.other"]
    assert len(out.steps[0].renamed) == 2 and len(out.steps[1].renamed) == 3


@pytest.mark.parametrize(
    ("op", "closest"),
    [
        (operation("strip_prefix", prefix="module."), "keys look like classifier.6.weight"),
        (operation("drop", prefix="classifer.6"), "closest: classifier.6"),
        (operation("keep", pattern="^clasifier"), "closest: classifier"),
        (operation("exclude", pattern="head"), "keys look like"),
        (operation("rename", pattern="^fc\\.", replacement="head."), "keys look like"),
        (operation("map", mapping={"classifer.6.weight": "x"}), "closest: classifier.6.weight"),
    ],
)
def test_operation_that_matches_nothing_is_refused_naming_the_closest_keys(op: Operation, closest: str) -> None:
    with pytest.raises(UsageError, match="matches no key") as err:
        run(state("classifier.6.weight", "classifier.6.bias", "features.0.weight"), op)
    assert op.describe() in str(err.value) and closest in str(err.value)


def test_policies_and_casts_that_change_nothing_are_fine() -> None:
    refs = {"n": ref("bn.num_batches_tracked", (), "int64")}
    out = run(initial_state(refs), operation("cast", dtype="float16"))
    assert out.steps[0].affected == 0


def test_cast_touches_floating_tensors_only():
    refs = {
        "w": ref("w"),
        "n": ref("bn.num_batches_tracked", (), "int64"),
        "h": ref("h", (4,), "bfloat16"),
        "b": ref("mask", (4,), "bool"),
    }
    out = run(initial_state(refs), operation("cast", dtype="float16"))
    assert {k: e.dtype for k, e in out.state.items()} == {"w": "float16", "n": "int64", "h": "float16", "b": "bool"}
    assert out.state["w"].source_dtype == "float32"
    assert out.steps[0].cast == ("w", "h")


TARGET = {
    "fc.weight": TargetTensor((10, 4), "float32", "parameter"),
    "fc.bias": TargetTensor((10,), "float32", "parameter"),
    "head.weight": TargetTensor((3, 3), "float32", "parameter"),
}


def test_policies_against_a_target():
    st = state(fc__weight=(1000, 4), fc__bias=(10,), old__weight=(2,))
    out = run(
        st, operation("fill_missing"), operation("drop_unexpected"), operation("reinit_mismatched"), target=TARGET
    )
    assert list(out.state) == ["fc.weight", "fc.bias", "head.weight"]
    assert out.steps[0].added == ("head.weight",)
    assert out.steps[1].dropped == ("old.weight",)
    assert out.steps[2].reinitialised == ("fc.weight",) and out.steps[2].dropped == ()
    assert out.state["fc.weight"].source == "target" and out.state["fc.weight"].shape == (10, 4)
    assert out.state["fc.bias"].source == "checkpoint"


def test_policy_without_target_is_a_usage_error():
    with pytest.raises(UsageError, match="needs the target architecture"):
        run(state("a"), operation("fill_missing"))


@pytest.mark.parametrize(
    "op, params, message",
    [
        ("explode", {}, "unknown operation"),
        ("drop", {}, "needs 'prefix'"),
        ("drop", {"prefix": ""}, "non-empty"),
        ("keep", {"pattern": "("}, "not a valid regular expression"),
        ("cast", {"dtype": "int8"}, "choose one of"),
        ("map", {"mapping": {"a": 1}}, "key strings"),
        ("rename", {"pattern": "a"}, "needs 'replacement'"),
    ],
)
def test_operation_validation(op, params, message):
    with pytest.raises(UsageError, match=message):
        operation(op, **params)


def test_parse_rename_splits_at_last_equals():
    op = parse_rename(r"^fc(?=\.)=head")
    assert op.params == {"pattern": r"^fc(?=\.)", "replacement": "head"}
    assert parse_rename("module\\.=").params == {"pattern": "module\\.", "replacement": ""}
    with pytest.raises(UsageError, match="REGEX=REPLACEMENT"):
        parse_rename("no-equals")


def test_describe_spells_the_command_line():
    assert operation("drop", prefix="classifier.6").describe() == "--drop classifier.6"
    assert operation("cast", dtype="bfloat16").describe() == "--dtype bfloat16"
    assert operation("fill_missing").describe() == "--fill-missing"
    assert operation("rename", pattern="a", replacement="b").describe() == "--rename a=b"


def test_plan_json_round_trip(tmp_path):
    plan = Plan(
        "a.pth",
        "model_state_dict",
        "resnet18",
        {"num_classes": 10},
        (operation("strip_prefix", prefix="module."), operation("reinit_mismatched")),
    )
    path = str(tmp_path / "plan.json")
    save_plan(plan, path)
    with open(path) as f:
        doc = json.load(f)
    assert doc == {
        "version": 1,
        "source": "a.pth",
        "key": "model_state_dict",
        "arch": "resnet18",
        "arch_args": {"num_classes": 10},
        "operations": [{"op": "strip_prefix", "prefix": "module."}, {"op": "reinit_mismatched"}],
    }
    assert load_plan(path) == plan


def test_plan_as_diff_writes_it_with_extra_fields():
    doc = {
        "version": 1,
        "source": "x.pth",
        "key": None,
        "arch": None,
        "arch_args": {},
        "operations": [{"op": "drop", "prefix": "fc", "reason": "not in the target"}, {"op": "drop_unexpected"}],
    }
    plan = plan_from_json(doc)
    assert [op.op for op in plan.operations] == ["drop", "drop_unexpected"]
    assert plan.key is None and plan.arch is None


@pytest.mark.parametrize(
    "text, message",
    [
        ("not json", "not valid JSON"),
        ("[]", "must be a JSON object"),
        ('{"version": 2, "operations": []}', "version 2 is not supported"),
        ('{"operations": {}}', "must be a list"),
        ('{"operations": [{"prefix": "a"}]}', "operation 0 is not an object"),
        ('{"operations": [{"op": "drop"}]}', "operation 0: operation 'drop' needs 'prefix'"),
        ('{"arch": 3, "operations": []}', "'arch' must be a string"),
    ],
)
def test_bad_plan_files(tmp_path, text, message):
    path = tmp_path / "plan.json"
    path.write_text(text)
    with pytest.raises(InputError, match=message):
        load_plan(str(path))


def test_missing_plan_file(tmp_path):
    with pytest.raises(InputError, match="no such file"):
        load_plan(str(tmp_path / "nope.json"))


def test_map_file(tmp_path):
    path = tmp_path / "map.json"
    path.write_text('{"fc.weight": "head.weight"}')
    out = run(state("fc.weight", "fc.bias"), load_mapping(str(path)))
    assert list(out.state) == ["head.weight", "fc.bias"]
    path.write_text('["fc.weight"]')
    with pytest.raises(InputError, match="JSON object"):
        load_mapping(str(path))


def test_relative_source_found_beside_the_plan(tmp_path, monkeypatch):
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "a.pth").write_bytes(b"x")
    save_plan(Plan("a.pth"), str(tmp_path / "sub" / "plan.json"))
    monkeypatch.chdir(tmp_path)
    assert load_plan("sub/plan.json").source == os.path.join("sub", "a.pth")
    (tmp_path / "a.pth").write_bytes(b"y")  # the current directory wins when it has the file
    assert load_plan("sub/plan.json").source == "a.pth"


def test_operations_round_trip_through_argv(tmp_path) -> None:
    from ckpt_tool.plan import operation_from_flag, operations_from_argv

    ops = [
        operation("drop", prefix="fc"),
        operation("rename", pattern="^a=(?=b)", replacement="c"),
        operation("strip_prefix", prefix="module."),
        operation("cast", dtype="bfloat16"),
        operation("fill_missing"),
        operation("keep", pattern="x"),
    ]
    argv = [a for op in ops for a in op.to_argv()]
    pairs = []
    for a in argv:
        if a.startswith("--"):
            pairs.append([a, None])
        else:
            pairs[-1][1] = a
    assert operations_from_argv([(f, v) for f, v in pairs]) == ops
    with pytest.raises(UsageError, match="not an operation"):
        operation_from_flag("--frobnicate", "x")
    with pytest.raises(UsageError, match="takes no value"):
        operation_from_flag("--fill-missing", "x")
    with pytest.raises(UsageError, match="no command-line form"):
        operation("map", mapping={"a": "b"}).to_argv()
    plan = Plan("a b.pth", arch="resnet18", arch_args={"num_classes": 10}, operations=tuple(ops[:1]))
    assert (
        plan.command("o.pth") == "ckpt migrate 'a b.pth' --arch resnet18 --arch-arg num_classes=10 --drop fc -o o.pth"
    )
    plan.save(str(tmp_path / "p.json"))
    assert Plan.load(str(tmp_path / "p.json")) == plan  # the atomic save leaves no temporary file
    assert os.listdir(tmp_path) == ["p.json"]
