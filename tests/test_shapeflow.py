"""Shape flow: the target's forward on the meta device names the layer that cannot take its input, with sizes."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path
from typing import Any

import pytest
import torch
import torchvision
from click.testing import CliRunner

from ckpt_tool.arch import target_signature
from ckpt_tool.cli import main
from ckpt_tool.diff import diff_paths
from ckpt_tool.diff import shapeflow as sf
from ckpt_tool.diff.shapeflow import FAILS, NOT_CHECKED, PASSES, TRUSTED, parse_input_shape, run_flow, shape_flow
from ckpt_tool.errors import UsageError

MODELS = textwrap.dedent('''
    from collections import OrderedDict

    import torchvision
    from torch import nn


    def densenet_800():
        """The seeds' question: a new head that expects 800 features where densenet121 gives 1024."""
        m = torchvision.models.densenet121(weights=None)
        m.classifier = nn.Sequential(OrderedDict(fc1=nn.Linear(800, 500), relu=nn.ReLU(), fc2=nn.Linear(500, 10)))
        return m


    def densenet_1024():
        m = torchvision.models.densenet121(weights=None)
        m.classifier = nn.Sequential(OrderedDict(fc1=nn.Linear(1024, 500), relu=nn.ReLU(), fc2=nn.Linear(500, 10)))
        return m


    class Gated(nn.Module):
        """Data-dependent control flow: a branch on a value, which the meta device does not have."""

        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 4)

        def forward(self, x):
            return self.fc(x) if x.sum() > 0 else x


    class Plain(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 8, 3)
            self.bn = nn.BatchNorm2d(6)

        def forward(self, x):
            return self.bn(self.conv(x))
''')


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Any:
    root = tmp_path_factory.mktemp("shapeflow")
    (root / "models.py").write_text(MODELS)
    with torch.device("meta"):
        densenet = torchvision.models.densenet121(weights=None)
    torch.save(densenet.to_empty(device="cpu").state_dict(), root / "densenet121.pth")
    torch.save({f"fc.{k}": v for k, v in torch.nn.Linear(4, 4).state_dict().items()}, root / "linear.pth")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("CKPT_CACHE_DIR", str(root / "cache"))
        yield root


def run(*args: Any) -> Any:
    return CliRunner().invoke(main, [str(a) for a in args])


def test_densenet_head_that_expects_800_names_both_modules_and_sizes(env: Path) -> None:
    report = diff_paths(str(env / "densenet121.pth"), arch=f"{env}/models.py:densenet_800")
    flow = report.shape_flow
    assert flow is not None and flow.status == FAILS
    assert (flow.producer, flow.consumer, flow.consumer_type) == ("features", "classifier.fc1", "Linear")
    assert (flow.actual, flow.expected, flow.producer_shape) == (1024, 800, (1, 1024, 7, 7))
    assert flow.message.startswith("features outputs 1024 channels, but classifier.fc1 (Linear) expects 800")
    assert flow.input_shape == (1, 3, 224, 224)
    # keys alone would drop the old head and fill the new one: a file that loads and cannot run
    assert [s.operation["op"] for s in report.plan.steps] == ["drop", "fill_missing"]
    assert report.plan.command is None and not report.plan.resolves and not report.ok
    assert any("no key operation can fix this" in n and "classifier.fc1" in n for n in report.plan.notes)
    assert report.plan.cannot_run == flow.message

    result = run("diff", env / "densenet121.pth", "--arch", f"{env}/models.py:densenet_800")
    assert result.exit_code == 1, result.output
    assert (
        "shape flow fails (input [1, 3, 224, 224], meta device): features outputs 1024 channels, but "
        "classifier.fc1 (Linear) expects 800" in result.output
    )
    assert "ckpt migrate" not in result.output
    data = json.loads(run("diff", env / "densenet121.pth", "--arch", f"{env}/models.py:densenet_800", "--json").output)
    assert data["shape_flow"]["status"] == "fails" and data["shape_flow"]["cache"] == "hit"
    assert data["plan"]["command"] is None


def test_a_head_that_fits_passes_and_the_command_is_offered(env: Path) -> None:
    report = diff_paths(str(env / "densenet121.pth"), arch=f"{env}/models.py:densenet_1024")
    assert report.shape_flow is not None and report.shape_flow.status == PASSES
    assert report.shape_flow.output_shape == (1, 10) and report.shape_flow.message == "[1, 3, 224, 224] -> [1, 10]"
    assert report.plan.command is not None and report.plan.resolves and not report.plan.cannot_run
    again = diff_paths(str(env / "densenet121.pth"), arch=f"{env}/models.py:densenet_1024")
    assert again.shape_flow == report.shape_flow.__class__(**{**report.shape_flow.to_json(), "cache": "hit"})


def test_a_forward_that_cannot_run_on_meta_is_not_checked_and_says_why(env: Path) -> None:
    report = diff_paths(str(env / "linear.pth"), arch=f"{env}/models.py:Gated", use_cache=False)
    flow = report.shape_flow
    assert flow is not None and flow.status == NOT_CHECKED and not flow.fails
    assert "cannot run on the meta device" in flow.message and "Gated" in flow.message and ".item()" in flow.message
    result = run("diff", env / "linear.pth", "--arch", f"{env}/models.py:Gated", "--no-cache")
    assert result.exit_code == 0, result.output  # loads strictly; the unchecked flow is said, not failed
    assert "shape flow not checked: the forward cannot run on the meta device" in result.output
    assert "loads strictly" in result.output


def test_input_shape_changes_the_dummy_input(env: Path) -> None:
    sig = target_signature("resnet18")
    assert sig.cache == "table"
    trusted = shape_flow(sig)
    assert trusted.status == TRUSTED and "--input-shape runs it" in trusted.message
    small = shape_flow(sig, input_shape=(2, 3, 64, 64))
    assert small.status == PASSES and small.output_shape == (2, 1000)
    one_channel = shape_flow(sig, input_shape=(1, 1, 64, 64))
    assert one_channel.status == FAILS and one_channel.consumer == "conv1" and one_channel.producer == "the input"
    assert one_channel.message.startswith("the input has 1 channels, but conv1 (Conv2d) expects 3")
    result = run("diff", env / "densenet121.pth", "--arch", "densenet121", "--input-shape", "1,3,64,64", "--json")
    assert json.loads(result.output)["shape_flow"]["output_shape"] == [1, 1000]


def test_the_planned_shapes_are_the_ones_that_flow() -> None:
    flow = run_flow(
        "resnet18",
        {},
        {
            "layer1.0.bn1.weight": (32,),
            "layer1.0.bn1.bias": (32,),
            "layer1.0.bn1.running_mean": (32,),
            "layer1.0.bn1.running_var": (32,),
        },
    )
    assert flow.status == FAILS and (flow.producer, flow.consumer) == ("layer1.0.conv1", "layer1.0.bn1")
    assert flow.message.startswith("layer1.0.conv1 outputs 64 channels, but layer1.0.bn1 (BatchNorm2d) expects 32")


def test_an_error_outside_a_known_layer_keeps_torchs_words(env: Path) -> None:
    flow = run_flow(f"{env}/models.py:Plain", {})
    assert flow.status == FAILS and flow.consumer == "bn" and flow.producer == "conv"
    assert flow.message.startswith("conv outputs 8 channels, but bn (BatchNorm2d) expects 6")


def test_migrate_dry_run_runs_the_flow(env: Path) -> None:
    args = [
        "migrate",
        env / "densenet121.pth",
        "--arch",
        f"{env}/models.py:densenet_800",
        "--drop",
        "classifier",
        "--fill-missing",
        "--dry-run",
    ]
    result = run(*args)
    assert result.exit_code == 1, result.output
    assert "against" in result.output and "loads with strict=True" in result.output
    assert "shape flow fails: features outputs 1024 channels, but classifier.fc1 (Linear) expects 800" in result.output
    fits = run(*[a if a != f"{env}/models.py:densenet_800" else f"{env}/models.py:densenet_1024" for a in args])
    assert fits.exit_code == 0 and "shape flow" not in fits.output, fits.output


def test_without_torch_the_flow_is_not_checked(monkeypatch: pytest.MonkeyPatch) -> None:
    sig = target_signature("resnet18", {"num_classes": 10, "zero_init_residual": True}, use_cache=False)
    monkeypatch.setattr("ckpt_tool.torch_extra.buildable", lambda spec: False)
    flow = sf.shape_flow(sig, use_cache=False)
    assert flow.status == NOT_CHECKED and "torch is not installed" in flow.message


@pytest.mark.parametrize("text", ["", "1,x", "1,0,3", "-1"])
def test_bad_input_shape_is_one_line_exit_2(env: Path, text: str) -> None:
    with pytest.raises(UsageError):
        parse_input_shape(text)
    result = run("diff", env / "linear.pth", "--arch", f"{env}/models.py:Gated", "--input-shape", text)
    assert result.exit_code == 2 and result.output.startswith("ckpt: error: --input-shape"), result.output


def test_input_shape_needs_an_architecture(env: Path) -> None:
    result = run("diff", env / "linear.pth", env / "linear.pth", "--input-shape", "1,4")
    assert result.exit_code == 2 and "--input-shape needs --arch" in result.output


def test_migrate_input_shape_needs_a_dry_run_with_an_architecture(env: Path, tmp_path: Path) -> None:
    result = run("migrate", env / "linear.pth", "--input-shape", "1,4", "-o", tmp_path / "out.pth")
    assert (
        result.exit_code == 2
        and "--input-shape sets the shape flow's input: it needs --dry-run and --arch" in result.output
    ), result.output
    assert not (tmp_path / "out.pth").exists()


def test_a_model_that_prints_in_forward_keeps_stdout_for_the_report(env: Path, tmp_path: Path) -> None:
    (tmp_path / "noisy.py").write_text(
        textwrap.dedent("""
        from torch import nn

        class Noisy(nn.Module):
            def __init__(self):
                super().__init__()
                self.fc = nn.Linear(4, 4)

            def forward(self, x):
                print("hello from forward")
                return self.fc(x)
    """)
    )
    result = run("diff", env / "linear.pth", "--arch", f"{tmp_path}/noisy.py:Noisy", "--json", "--no-cache")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["shape_flow"]["status"] == PASSES
