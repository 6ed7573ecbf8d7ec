"""diff.py against torch itself: for every scenario of issue #3, missing/unexpected/size-mismatch keys
equal what ``load_state_dict`` reports, and the suggested plan, applied to the real state dict, loads strictly."""

from __future__ import annotations

import re
import shlex
import textwrap
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
import torchvision
from torch import nn

from ckpt_tool.arch import build_model, parse_arch_args, target_signature
from ckpt_tool.diff import (
    DTYPE,
    MATCHED,
    MISSING,
    SHAPE,
    UNEXPECTED,
    Row,
    compare_values,
    diff,
    diff_paths,
    fold_rows,
    format_indices,
    shapes_load,
)
from ckpt_tool.errors import InputError, KeyPathError, OutputError, UsageError
from ckpt_tool.plan import plan_from_json
from ckpt_tool.reader import open_checkpoint
from ckpt_tool.values import FileCache

MODELS_PY = textwrap.dedent("""
    from collections import OrderedDict

    import torchvision
    from torch import nn


    def vgg16_linder():
        m = torchvision.models.vgg16(weights=None)
        m.classifier.add_module("add_linder", nn.Linear(1000, 10))
        return m


    def vgg16_headless():
        m = torchvision.models.vgg16(weights=None)
        del m.classifier[6]
        return m


    def resnet18_10():
        m = torchvision.models.resnet18(weights=None)
        m.fc = nn.Linear(512, 10)
        return m


    def densenet121_head():
        m = torchvision.models.densenet121(weights=None)
        m.classifier = nn.Sequential(OrderedDict([
            ("fc1", nn.Linear(1024, 512)), ("relu", nn.ReLU()), ("fc2", nn.Linear(512, 128)),
            ("output", nn.Linear(128, 10)),
        ]))
        return m


    def densenet121_renamed():
        m = torchvision.models.densenet121(weights=None)
        m.classifier = nn.Sequential(OrderedDict([("fc1", nn.Linear(1024, 1000))]))
        return m


    class Wrapped(nn.Module):
        def __init__(self, num_classes=1000):
            super().__init__()
            self.backbone = torchvision.models.squeezenet1_0(weights=None, num_classes=num_classes)


    def squeezenet_extra():
        m = torchvision.models.squeezenet1_0(weights=None, num_classes=10)
        m.extra = nn.Linear(4, 4)
        return m
""")


def empty_state_dict(name: str, **kwargs: Any) -> dict[str, torch.Tensor]:
    """A torchvision model's state dict with uninitialised values: only keys and shapes matter here."""
    with torch.device("meta"):
        model = torchvision.models.get_model(name, weights=None, **kwargs)
    return model.to_empty(device="cpu").state_dict()


def torch_says(spec: str, args: dict[str, Any], sd: dict[str, torch.Tensor]) -> tuple[set[str], set[str], set[str]]:
    """(missing, unexpected, size-mismatched) as load_state_dict(strict=False) reports them."""
    model = build_model(spec, args, device="meta")
    seen: dict[str, set[str]] = {}
    # the root's post hook runs last and sees the complete lists, even when size mismatches then raise
    model.register_load_state_dict_post_hook(
        lambda m, keys: seen.update(missing=set(keys.missing_keys), unexpected=set(keys.unexpected_keys))
    )
    mismatched: set[str] = set()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            model.load_state_dict(sd, strict=False)
        except RuntimeError as exc:
            mismatched = set(re.findall(r"size mismatch for (\S+):", str(exc)))
            assert mismatched, exc
    return seen["missing"], seen["unexpected"], mismatched


def statuses(report: Any, status: str) -> set[str]:
    return {k.key for k in report.keys if k.status == status}


def apply_plan_in_torch(document: dict[str, Any], sd: dict[str, torch.Tensor], spec: str, args: dict[str, Any]) -> None:
    """Apply a plan document to a real state dict by hand, then load it strictly: torch judges the plan."""
    target = build_model(spec, args, device="meta").state_dict()
    out = dict(sd)
    for op in document["operations"]:
        name = op["op"]
        if name == "strip_prefix":
            out = {k[len(op["prefix"]) :] if k.startswith(op["prefix"]) else k: v for k, v in out.items()}
        elif name == "add_prefix":
            out = {op["prefix"] + k: v for k, v in out.items()}
        elif name == "rename":
            out = {re.sub(op["pattern"], op["replacement"], k): v for k, v in out.items()}
        elif name == "drop":
            out = {k: v for k, v in out.items() if not (k == op["prefix"] or k.startswith(op["prefix"] + "."))}
        elif name == "drop_unexpected":
            out = {k: v for k, v in out.items() if k in target}
        elif name == "fill_missing":
            out.update({k: torch.empty(t.shape, dtype=t.dtype) for k, t in target.items() if k not in out})
        elif name == "reinit_mismatched":
            out.update(
                {
                    k: torch.empty(target[k].shape, dtype=target[k].dtype)
                    for k, v in out.items()
                    if k in target and v.shape != target[k].shape
                }
            )
        else:
            raise AssertionError(f"unexpected op {name}")
    model = build_model(spec, args, device="meta")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.load_state_dict(out, strict=True)


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Any:
    root = tmp_path_factory.mktemp("diff")
    (root / "models.py").write_text(MODELS_PY)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("CKPT_CACHE_DIR", str(root / "cache"))
        yield root


def saved(path: Path, sd: dict[str, torch.Tensor]) -> tuple[str, dict[str, torch.Tensor]]:
    torch.save(sd, path)
    return str(path), sd


@pytest.fixture(scope="module")
def vgg16(env: Path) -> tuple[str, dict[str, torch.Tensor]]:
    return saved(env / "vgg16.pth", empty_state_dict("vgg16"))


@pytest.fixture(scope="module")
def densenet(env: Path) -> tuple[str, dict[str, torch.Tensor]]:
    return saved(env / "densenet121.pth", empty_state_dict("densenet121"))


@pytest.fixture(scope="module")
def resnet(env: Path, models: Any) -> tuple[str, dict[str, torch.Tensor]]:
    return models.saved("resnet18"), models.state_dict("resnet18")


def check_against_torch(
    path: str, sd: dict[str, torch.Tensor], spec: str, args: dict[str, Any], key: str | None = None
) -> Any:
    report = diff_paths(path, arch=spec, arch_args=args, key=key)
    missing, unexpected, mismatched = torch_says(spec, args, sd)
    assert statuses(report, MISSING) == missing
    assert statuses(report, UNEXPECTED) == unexpected
    assert statuses(report, SHAPE) == mismatched
    assert report.counts.missing == len(missing) and report.counts.unexpected == len(unexpected)
    assert report.loads_strictly == (not missing and not unexpected and not mismatched)
    if not report.loads_strictly:
        assert report.plan.resolves
        apply_plan_in_torch(report.plan.document, sd, spec, args)
    return report


# --- the six scenarios ---------------------------------------------------------------------------------


def test_scenario1_added_layer_is_filled(env: Path, vgg16: Any) -> None:
    path, sd = vgg16
    report = check_against_torch(path, sd, f"{env}/models.py:vgg16_linder", {})
    assert statuses(report, MISSING) == {"classifier.add_linder.weight", "classifier.add_linder.bias"}
    assert [s.operation for s in report.plan.steps] == [{"op": "fill_missing"}]
    assert report.counts.filled_share == pytest.approx(1 - 10010 / (report.counts.target_numel))


def test_scenario2_removed_layer_is_dropped(env: Path, vgg16: Any) -> None:
    path, sd = vgg16
    report = check_against_torch(path, sd, f"{env}/models.py:vgg16_headless", {})
    assert statuses(report, UNEXPECTED) == {"classifier.6.weight", "classifier.6.bias"}
    assert [s.operation for s in report.plan.steps] == [{"op": "drop", "prefix": "classifier.6"}]
    assert "--drop classifier.6" in report.plan.command
    assert report.counts.filled_share == 1.0


def test_scenario2_same_file_loads_strictly_into_vgg16(vgg16: Any) -> None:
    path, sd = vgg16
    report = check_against_torch(path, sd, "vgg16", {})
    assert report.loads_strictly and report.plan.steps == () and report.plan.command is None
    assert report.counts.matched == 32 and report.counts.target_keys == 32


@pytest.mark.parametrize("form", ["torchvision", "file"])
def test_scenario3_head_shape_mismatch(env: Path, resnet: Any, form: str) -> None:
    path, sd = resnet
    spec, args = ("resnet18", {"num_classes": 10}) if form == "torchvision" else (f"{env}/models.py:resnet18_10", {})
    report = check_against_torch(path, sd, spec, args)
    assert statuses(report, SHAPE) == {"fc.weight", "fc.bias"}
    assert [s.operation for s in report.plan.steps] == [{"op": "reinit_mismatched"}]
    fc = next(k for k in report.keys if k.key == "fc.weight")
    assert (fc.source_shape, fc.target_shape) == ((1000, 512), (10, 512))
    assert report.counts.filled_numel == report.counts.target_numel - 5130


def test_scenario4_densenet_new_head(env: Path, densenet: Any) -> None:
    path, sd = densenet
    report = check_against_torch(path, sd, f"{env}/models.py:densenet121_head", {})
    assert statuses(report, UNEXPECTED) == {"classifier.weight", "classifier.bias"}
    assert len(statuses(report, MISSING)) == 6
    ops = [s.operation for s in report.plan.steps]
    assert ops == [{"op": "drop", "prefix": "classifier"}, {"op": "fill_missing"}]


def test_scenario4_densenet_renamed_head_becomes_a_rename(env: Path, densenet: Any) -> None:
    path, sd = densenet
    report = check_against_torch(path, sd, f"{env}/models.py:densenet121_renamed", {})
    ops = [s.operation for s in report.plan.steps]
    assert ops == [{"op": "rename", "pattern": r"^classifier\.", "replacement": "classifier.fc1."}]
    assert "--rename '^classifier\\.=classifier.fc1.'" in report.plan.command


def test_scenario5_dataparallel_nested(env: Path) -> None:
    model = torchvision.models.resnet18(weights=None)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    optimizer.step()
    dp_sd = nn.DataParallel(model).state_dict()
    path = env / "nested_dp.pth"
    torch.save({"model_state_dict": dp_sd, "optimizer_state_dict": optimizer.state_dict(), "epoch": 3}, path)
    for key in (None, "model_state_dict"):
        report = check_against_torch(str(path), dp_sd, "resnet18", {}, key=key)
        assert report.source_key == "model_state_dict"
        assert report.counts.matched == 0 and report.counts.filled_share == 0.0
        assert [s.operation for s in report.plan.steps] == [{"op": "strip_prefix", "prefix": "module."}]
        assert report.plan.document["key"] == "model_state_dict"
        assert "--key model_state_dict" in report.plan.command
    with pytest.raises(KeyPathError):
        diff_paths(str(path), arch="resnet18", key="optimizer_state_dict")


def test_scenario6_intersecting_keys(env: Path) -> None:
    sd = empty_state_dict("squeezenet1_0")
    raw = env / "squeeze.pth"
    torch.save(sd, raw)
    spec = f"{env}/models.py:squeezenet_extra"
    report = check_against_torch(str(raw), sd, spec, {})
    assert statuses(report, SHAPE) == {"classifier.1.weight", "classifier.1.bias"}
    assert statuses(report, MISSING) == {"extra.weight", "extra.bias"}
    # the seed's filter: keep what the model has, with the model's shapes
    target = build_model(spec, {}, device="meta").state_dict()
    wanted = {k: v for k, v in sd.items() if k in target and v.shape == target[k].shape}
    filtered = env / "squeeze_filtered.pth"
    torch.save(wanted, filtered)
    report = check_against_torch(str(filtered), wanted, spec, {})
    assert statuses(report, UNEXPECTED) == set() and statuses(report, SHAPE) == set()
    assert statuses(report, MISSING) == {"classifier.1.weight", "classifier.1.bias", "extra.weight", "extra.bias"}
    assert [s.operation for s in report.plan.steps] == [{"op": "fill_missing"}]


# --- prefixes and renames --------------------------------------------------------------------------------


def test_add_prefix_when_the_target_wraps_the_model(env: Path) -> None:
    sd = empty_state_dict("squeezenet1_0")
    path = env / "plain_squeeze.pth"
    torch.save(sd, path)
    report = check_against_torch(str(path), sd, f"{env}/models.py:Wrapped", {})
    assert [s.operation for s in report.plan.steps] == [{"op": "add_prefix", "prefix": "backbone."}]


def test_compiled_prefix_and_block_renames_fold_into_one_rule(tmp_path: Path) -> None:
    class Blocks(nn.Module):
        def __init__(self, name: str) -> None:
            super().__init__()
            self.add_module(name, nn.ModuleList(nn.Linear(4, 4) for _ in range(3)))
            self.head = nn.Linear(4, 2)

    src = {f"_orig_mod.{k}": v for k, v in Blocks("blocks").state_dict().items()}
    path = tmp_path / "compiled.pth"
    torch.save(src, path)
    (tmp_path / "m.py").write_text(
        MODELS_PY
        + textwrap.dedent("""
        class Blocks(nn.Module):
            def __init__(self):
                super().__init__()
                self.layers = nn.ModuleList(nn.Linear(4, 4) for _ in range(3))
                self.head = nn.Linear(4, 2)
    """)
    )
    report = check_against_torch(str(path), src, f"{tmp_path}/m.py:Blocks", {})
    ops = [s.operation for s in report.plan.steps]
    assert ops == [
        {"op": "strip_prefix", "prefix": "_orig_mod."},
        {"op": "rename", "pattern": r"^blocks\.(\d+)\.", "replacement": r"layers.\1."},
    ]
    assert "torch.compile" in report.plan.steps[0].reason


def test_ambiguous_rename_is_not_guessed(tmp_path: Path) -> None:
    (tmp_path / "m.py").write_text(
        textwrap.dedent("""
        from torch import nn
        def two():
            m = nn.Module()
            m.a = nn.Linear(4, 4)
            m.b = nn.Linear(4, 4)
            return m
        def one():
            m = nn.Module()
            m.c = nn.Linear(4, 4)
            return m
    """)
    )
    torch.save(build_model(f"{tmp_path}/m.py:two", {}).state_dict(), tmp_path / "two.pth")
    report = diff_paths(str(tmp_path / "two.pth"), arch=f"{tmp_path}/m.py:one")
    assert all(s.operation["op"] != "rename" for s in report.plan.steps)
    assert any("no one-to-one pairing" in n for n in report.plan.notes)


def test_plan_out_loads_through_plan_module(env: Path, resnet: Any, tmp_path: Path) -> None:
    plan_mod = pytest.importorskip("ckpt_tool.plan")
    path, _ = resnet
    out = tmp_path / "plan.json"
    report = diff_paths(path, arch="resnet18", arch_args=["num_classes=10"], plan_out=str(out))
    assert report.plan_path == str(out)
    plan = plan_mod.load_plan(str(out))
    assert (plan.source, plan.arch, plan.arch_args) == (path, "resnet18", {"num_classes": 10})
    ckpt = open_checkpoint(path)
    sig = target_signature("resnet18", {"num_classes": 10})
    applied = plan_mod.apply(plan.operations, plan_mod.initial_state(ckpt.tensors), sig.tensors)
    assert {k: e.shape for k, e in applied.state.items()} == {k: t.shape for k, t in sig.tensors.items()}


# --- checkpoint against checkpoint, values ------------------------------------------------------------


def test_checkpoint_vs_checkpoint_values(tmp_path: Path) -> None:
    torch.manual_seed(0)
    before = torchvision.models.resnet18(weights=None, num_classes=10).state_dict()
    after = {k: v.clone() for k, v in before.items()}
    after["fc.weight"] += 0.5
    after["fc.bias"] = after["fc.bias"].half()
    after["layer4.1.conv2.weight"] = (
        after["layer4.1.conv2.weight"].transpose(0, 1).contiguous().transpose(0, 1)
    )  # same values, strided
    torch.save(before, tmp_path / "a.pth")
    torch.save(after, tmp_path / "b.pth")
    ticks: list[tuple[int, int]] = []
    report = diff_paths(
        str(tmp_path / "a.pth"),
        str(tmp_path / "b.pth"),
        values=True,
        progress=lambda n, total: ticks.append((n, total)),
    )
    assert report.target_kind == "checkpoint" and report.loads_strictly
    both = sum(t.numel() * t.element_size() for t in before.values()) + sum(
        t.numel() * t.element_size() for t in after.values()
    )
    assert len(ticks) == len(before) and sum(n for n, _ in ticks) == both and {t for _, t in ticks} == {both}
    by_key = {k.key: k for k in report.keys}
    assert by_key["fc.weight"].max_abs_diff == pytest.approx(0.5)
    expected_rel = (0.5 * before["fc.weight"].numel() ** 0.5) / before["fc.weight"].norm().item()
    assert by_key["fc.weight"].rel_change == pytest.approx(expected_rel, rel=1e-5)
    assert by_key["fc.bias"].status == DTYPE
    assert by_key["fc.bias"].max_abs_diff == pytest.approx(
        (before["fc.bias"] - before["fc.bias"].half().float()).abs().max().item(), abs=1e-7
    )
    assert by_key["layer4.1.conv2.weight"].max_abs_diff == 0.0
    assert report.counts.changed == 2 and report.counts.unchanged == len(before) - 2
    assert report.counts.dtype_differences == 1
    assert {r.name for r in report.rows} == {"fc.weight", "fc.bias"}


def test_compare_values_streams_in_chunks(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import ckpt_tool.diff.valuediff as diff_mod

    monkeypatch.setattr(diff_mod, "VALUE_CHUNK_ELEMENTS", 7)
    a = torch.arange(100, dtype=torch.float32)
    b = a.clone()
    b[93] = float("nan")
    b[3] = 10.0
    torch.save({"x": a, "y": a.clone()}, tmp_path / "a.pth")
    torch.save({"x": b, "y": a.to(torch.bfloat16)}, tmp_path / "b.pth")
    sa, sb = open_checkpoint(str(tmp_path / "a.pth")), open_checkpoint(str(tmp_path / "b.pth"))
    with FileCache() as files:
        max_abs, rel = compare_values(sa.tensors["x"], sb.tensors["x"], files)
        assert max_abs != max_abs and rel != rel  # a NaN on one side only
        max_abs, rel = compare_values(sa.tensors["y"], sb.tensors["y"], files)
    assert max_abs == (a - a.to(torch.bfloat16).float()).abs().max().item()


def test_checkpoint_vs_checkpoint_plan_cannot_fill(tmp_path: Path) -> None:
    torch.save({"a.weight": torch.zeros(2), "b.weight": torch.zeros(3)}, tmp_path / "x.pth")
    torch.save({"a.weight": torch.zeros(2), "c.weight": torch.zeros(4)}, tmp_path / "y.pth")
    report = diff_paths(str(tmp_path / "x.pth"), str(tmp_path / "y.pth"))
    assert [s.operation for s in report.plan.steps] == [{"op": "drop", "prefix": "b"}]
    assert not report.plan.resolves and any("use --arch" in n for n in report.plan.notes)


# --- rows, folding, depth ------------------------------------------------------------------------------


def test_format_indices() -> None:
    assert format_indices([0, 2, 5]) == "0,2,5"
    assert format_indices([3, 0, 1, 2, 5, 7, 8]) == "0..3,5,7..8"
    assert format_indices([4]) == "4"


def test_fold_rows_folds_only_equal_rows() -> None:
    rows = [Row(f"features.{i}.weight", MISSING, 1, target_shape=(4,), target_dtype="float32") for i in (0, 2, 5)]
    rows.append(Row("features.7.weight", MISSING, 1, target_shape=(8,), target_dtype="float32"))
    rows.append(Row("layer1.0.conv1.weight", SHAPE, 1, (1,), "float32", (2,), "float32"))
    rows.append(Row("layer1.1.conv1.weight", SHAPE, 1, (1,), "float32", (2,), "float32"))
    folded = fold_rows(rows)
    assert [(r.name, r.keys) for r in folded] == [
        ("features.{0,2,5}.weight", 3),
        ("features.7.weight", 1),
        ("layer1.{0..1}.conv1.weight", 2),
    ]


def test_depth_rows_and_all(resnet: Any) -> None:
    path, _ = resnet
    report = diff_paths(path, arch="resnet18", arch_args=["num_classes=10"], depth=1)
    assert [(r.name, r.status, r.keys) for r in report.rows] == [("fc", SHAPE, 2)]
    assert report.hidden_rows == 6  # conv1, bn1, layer1..layer4
    report = diff_paths(path, arch="resnet18", arch_args=["num_classes=10"], depth=2, show_all=True)
    names = [r.name for r in report.rows]
    assert "layer{1..4}.0" not in names and "layer1.{0..1}" in names and report.hidden_rows == 0
    report = diff_paths(path, arch="resnet18", show_all=True)
    assert all(r.status == MATCHED for r in report.rows) and sum(r.keys for r in report.rows) == 122


def test_shapes_load_follows_torch_scalar_rule() -> None:
    assert shapes_load((1,), ()) and shapes_load((3, 4), (3, 4))
    assert not shapes_load((3,), ()) and not shapes_load((), (1,)) and not shapes_load((4, 3), (3, 4))


def test_scalar_rule_against_torch(tmp_path: Path) -> None:
    (tmp_path / "m.py").write_text(
        textwrap.dedent("""
        import torch
        from torch import nn
        def scalar():
            m = nn.Module()
            m.register_buffer("s", torch.zeros(()))
            m.register_buffer("t", torch.zeros(()))
            return m
    """)
    )
    sd = {"s": torch.zeros(1), "t": torch.zeros(3)}
    torch.save(sd, tmp_path / "s.pth")
    report = check_against_torch(str(tmp_path / "s.pth"), sd, f"{tmp_path}/m.py:scalar", {})
    assert statuses(report, SHAPE) == {"t"}


# --- bad input ----------------------------------------------------------------------------------------


def test_usage_errors(resnet: Any, tmp_path: Path) -> None:
    path, _ = resnet
    with pytest.raises(UsageError, match="not both"):
        diff_paths(path, path, arch="resnet18")
    with pytest.raises(UsageError, match="second checkpoint or --arch"):
        diff_paths(path)
    with pytest.raises(UsageError, match="--values"):
        diff_paths(path, arch="resnet18", values=True)
    with pytest.raises(UsageError, match="--arch-arg needs"):
        diff_paths(path, path, arch_args=["num_classes=3"])
    with pytest.raises(UsageError, match="--target-key"):
        diff_paths(path, arch="resnet18", target_key="x")
    with pytest.raises(UsageError, match="--depth"):
        diff_paths(path, path, depth=0)
    with pytest.raises(OutputError, match="overwrite the checkpoint"):
        diff_paths(path, path, plan_out=path)
    with pytest.raises(OutputError, match="cannot create a file"):
        diff_paths(path, arch="resnet18", plan_out=str(tmp_path / "no" / "such" / "dir.json"))


def test_checkpoint_without_tensors(tmp_path: Path) -> None:
    torch.save({"epoch": 3}, tmp_path / "meta.pth")
    with pytest.raises(InputError, match="no tensors"):
        diff(open_checkpoint(str(tmp_path / "meta.pth")), open_checkpoint(str(tmp_path / "meta.pth")))


def test_migrate_command_quotes_and_round_trips_arch_args() -> None:
    doc = {
        "source": "my model.pth",
        "key": None,
        "arch": "x.py:f",
        "arch_args": {"name": "True", "n": 3},
        "operations": [{"op": "rename", "pattern": r"^a\.", "replacement": "b."}, {"op": "drop_unexpected"}],
    }
    argv = shlex.split(plan_from_json(doc).command())
    assert argv == [
        "ckpt",
        "migrate",
        "my model.pth",
        "--arch",
        "x.py:f",
        "--arch-arg",
        "n=3",
        "--arch-arg",
        "name='True'",
        "--rename",
        r"^a\.=b.",
        "--drop-unexpected",
        "-o",
        "my model.fixed.pth",
    ]
    assert parse_arch_args([argv[6], argv[8]]) == {"n": 3, "name": "True"}


def test_safetensors_without_num_batches_tracked_matches_torch(env: Path, resnet: Any) -> None:
    """safetensors carries no version metadata: torch fills num_batches_tracked in, so they are not missing."""
    from safetensors.torch import load_file, save_file

    _, sd = resnet
    path = env / "no_nbt.safetensors"
    save_file({k: v for k, v in sd.items() if not k.endswith("num_batches_tracked")}, str(path))
    report = check_against_torch(str(path), load_file(str(path)), "resnet18", {})
    assert report.loads_strictly and report.counts.auto_filled == 20 and report.counts.missing == 0
    assert any("num_batches_tracked" in n for n in report.notes)
    # the same keys in a torch file saved from state_dict() carry version 2: torch then reports them missing
    kept = type(sd)((k, v) for k, v in sd.items() if not k.endswith("num_batches_tracked"))
    kept._metadata = sd._metadata  # type: ignore[attr-defined]
    torch.save(kept, env / "no_nbt.pth")
    report = check_against_torch(str(env / "no_nbt.pth"), kept, "resnet18", {})
    assert report.counts.missing == 20 and report.counts.auto_filled == 0
