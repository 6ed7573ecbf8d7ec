"""``ckpt finetune-check`` through Click: exit codes, the rendered report, --json, and one-line errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from click.testing import CliRunner

from ckpt_tool.cli import main

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
IMAGEFOLDER = os.path.join(ROOT, "fixtures", "imagefolder")
FAST = ["--image-size", "32", "--batch-size", "4", "--max-steps", "2", "--eval-batches", "1", "--lr", "0.01"]

USER_MODEL = '''
import torch
from torch import nn


class Net(nn.Module):
    """The user's notes: a features block that outputs 800 in front of a classifier that expects 1024."""

    def __init__(self, num_classes=10, hidden=1024):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 50, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(4))
        self.classifier = nn.Sequential(nn.Linear(hidden, 64), nn.ReLU(), nn.Linear(64, num_classes))

    def forward(self, x):
        return self.classifier(torch.flatten(self.features(x), 1))


def net(**kw):
    return Net(**kw)
'''


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    import torch
    import torchvision

    root = tmp_path_factory.mktemp("finetune_cli")
    torch.manual_seed(0)
    resnet = root / "resnet18.pth"
    torch.save(torchvision.models.resnet18(weights=None).state_dict(), resnet)
    user = root / "user_model.py"
    user.write_text(USER_MODEL)
    sys.path.insert(0, str(root))
    try:
        import user_model  # noqa: F401 - the same module the CLI will load by path

        net = user_model.Net(hidden=800)
    finally:
        sys.path.remove(str(root))
    small = root / "net.pth"
    torch.save(net.state_dict(), small)
    return {"root": root, "resnet": str(resnet), "user": str(user), "net": str(small)}


def run(*args: str):
    return CliRunner().invoke(main, ["finetune-check", *args])


def assert_one_line_error(result, code: int, *fragments: str) -> None:
    assert result.exit_code == code, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit)
    assert "Traceback" not in result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    error = [line for line in lines if line.startswith("ckpt: error:")]
    assert len(error) == 1, result.output
    for fragment in fragments:
        assert fragment in error[0], error[0]


def test_healthy_run_exits_0_with_tables(files):
    result = run(files["resnet"], "--arch", "resnet18", "--num-classes", "10", "--trainable", "fc", *FAST)
    assert result.exit_code == 0, result.output
    out = result.output
    assert out.splitlines()[0] == f"{files['resnet']} -> resnet18 on cpu, data synthetic, 32px, 10 classes"
    assert "PASS: every check passed" in out
    assert "mismatched (head)  fc.weight  [1000, 512]   [10, 512]" in out
    assert (
        "head: fc Linear(in_features=512, out_features=1000, bias=True) -> Linear(in_features=512, out_features=10"
        in out
    )
    assert "layer4              0     8.39M" in out and "fc               5130         0" in out
    for name in (
        "weights loaded",
        "forward pass",
        "loss finite",
        "overfit one batch",
        "frozen unchanged",
        "trainable changed",
        "gradients",
    ):
        assert any(line.startswith(name) and " PASS " in line for line in out.splitlines()), name


def test_json_report(files):
    result = run(files["resnet"], "--arch", "resnet18", "--num-classes", "4", "--freeze-first", "5", "--json", *FAST)
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    assert data["passed"] is True and data["num_classes"] == 4 and data["head"]["module"] == "fc"
    assert [c["name"] for c in data["checks"]][:3] == ["weights loaded", "forward pass", "training runs"]
    assert all(c["status"] in ("pass", "info") for c in data["checks"])
    assert len(data["losses"]) == 2 and data["load"]["loaded"] == 120
    frozen = {p["module"]: p["frozen"] for p in data["params"]}
    assert frozen["conv1"] == 9408 and frozen["bn1"] == 128 and frozen["layer1"] == 147968 and frozen["layer2"] == 0


def test_failed_check_exits_1(files):
    result = run(
        files["resnet"],
        "--arch",
        "resnet18",
        "--num-classes",
        "3",
        "--lr",
        "1e8",
        "--optimizer",
        "sgd",
        "--image-size",
        "32",
        "--batch-size",
        "4",
        "--max-steps",
        "3",
        "--overfit-steps",
        "3",
        "--eval-batches",
        "1",
    )
    assert result.exit_code == 1, result.output
    assert "FAIL: 2 check(s) failed: loss finite, overfit one batch" in result.output


def test_shape_error_names_both_modules(files):
    result = run(files["net"], "--arch", files["user"] + ":net", *FAST)
    assert result.exit_code == 1, result.output
    assert (
        "features outputs [2, 50, 4, 4], but classifier.0 (Linear) expects 1024 input features and receives [2, 800]"
    ) in result.output
    assert "Traceback" not in result.output


def test_imagefolder_and_save(files, tmp_path, torch):
    from safetensors.torch import load_file

    out = tmp_path / "tuned.safetensors"
    result = run(
        files["resnet"],
        "--arch",
        "resnet18",
        "--num-classes",
        "3",
        "--data",
        "imagefolder:" + IMAGEFOLDER,
        "--save",
        str(out),
        *FAST,
    )
    assert result.exit_code == 0, result.output
    assert f"saved fine-tuned weights to {out}" in result.output
    assert load_file(str(out))["fc.weight"].shape == (3, 512)
    again = run(files["resnet"], "--arch", "resnet18", "--save", str(out), *FAST)
    assert_one_line_error(again, 2, "exists", "--force")


@pytest.mark.parametrize(
    "args, fragments",
    [
        (["--epochs", "0"], ["--epochs must be at least 1"]),
        (["--freeze", "layr1"], ["--freeze 'layr1' matches no parameter"]),
        (["--data", "cifar10:/nonexistent"], ["CIFAR-10 not found", "never downloads"]),
        (["--data", "mnist"], ["expected synthetic"]),
        (["--amp", "--device", "cpu"], ["--amp needs a CUDA device"]),
        (["--arch-arg", "oops"], ["--arch-arg 'oops' is not NAME=VALUE"]),
        (["--key", "nope"], ["nope"]),
        (["--head", "nowhere", "--num-classes", "3"], ["--head nowhere: the model has no such module"]),
        (["--freeze-epochs", "1"], ["leaves no epoch", "--epochs 2"]),
    ],
)
def test_bad_arguments_exit_2(files, args, fragments):
    assert_one_line_error(run(files["resnet"], "--arch", "resnet18", *FAST, *args), 2, *fragments)


def test_cuda_request_without_gpu(files, torch):
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present")
    assert_one_line_error(
        run(files["resnet"], "--arch", "resnet18", "--device", "cuda", *FAST), 2, "no CUDA device is available"
    )


def test_bad_files_exit_2(files, tmp_path):
    empty = tmp_path / "empty.pth"
    empty.write_bytes(b"")
    assert_one_line_error(run(str(empty), "--arch", "resnet18", *FAST), 2, "empty")
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"\x00not a checkpoint" * 10)
    assert_one_line_error(run(str(garbage), "--arch", "resnet18", *FAST), 2, "not a recognised checkpoint")
    truncated = tmp_path / "truncated.pth"
    truncated.write_bytes(open(files["resnet"], "rb").read()[:200_000])
    assert_one_line_error(run(str(truncated), "--arch", "resnet18", *FAST), 2, "truncated.pth")
    assert_one_line_error(run(str(tmp_path / "missing.pth"), "--arch", "resnet18", *FAST), 2, "missing.pth")
    assert_one_line_error(run(files["resnet"], "--arch", "resnet1888", *FAST), 2, "not a torchvision model")


def test_plot_missing_matplotlib_message(files, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "matplotlib" else real(name, *a))
    assert_one_line_error(
        run(files["resnet"], "--arch", "resnet18", "--plot", "x.png", *FAST),
        2,
        "--plot needs matplotlib",
        "pip install 'ckpt-tool[plot]'",
    )


def test_help_lists_options_and_stays_torch_free():
    result = CliRunner().invoke(main, ["finetune-check", "--help"])
    assert result.exit_code == 0
    for option in (
        "--num-classes",
        "--freeze-first",
        "--freeze-epochs",
        "--unfreeze-lr",
        "--trainable",
        "--plan",
        "--strip-prefix",
        "--data",
        "--amp",
        "--plot",
        "--save",
        "--json",
    ):
        assert option in result.output, option
    code = "import sys, ckpt_tool.cli; sys.exit(1 if 'torch' in sys.modules else 0)"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0


def test_progress_bar_draws_on_stderr(capsys):
    from ckpt_tool.commands.finetune_cmd import _ProgressBar
    from ckpt_tool.finetune import ProgressEvent

    bar = _ProgressBar()
    bar.close()
    assert capsys.readouterr().err == ""  # nothing drawn, nothing to end
    bar(ProgressEvent("train", 1, 2, 4, 1.23456, 99.5, epochs=3, eta_s=75.4))
    bar.close()
    err = capsys.readouterr().err
    assert err == "\rtrain epoch 1/3 [##########..........] step 2/4 loss 1.2346 99.5 img/s ETA 1:15 \n"


def test_failed_run_json_says_so(files):
    result = run(files["net"], "--arch", files["user"] + ":net", "--json", *FAST)
    assert result.exit_code == 1
    data = json.loads(result.output)
    assert data["passed"] is False
    assert {c["name"]: c["status"] for c in data["checks"]}["forward pass"] == "fail"


def test_inline_operations_in_command_line_order_and_load_table_shapes(files, tmp_path, torch):
    state = torch.load(files["net"], weights_only=True)
    state["extra.weight"] = torch.zeros(3, 2)
    path = str(tmp_path / "extra.pth")
    torch.save(state, path)
    net = ["--arch", files["user"] + ":net", "--arch-arg", "hidden=800"]
    drop_fill = run(path, *net, "--drop", "classifier.2", "--fill-missing", *FAST)
    assert drop_fill.exit_code == 0, drop_fill.output
    assert "operations: --drop classifier.2, --fill-missing" in drop_fill.output
    assert "unexpected  extra.weight  [3, 2]        -" in drop_fill.output
    fill_drop = run(path, *net, "--fill-missing", "--drop", "classifier.2", *FAST)
    assert fill_drop.exit_code == 1 and "operations: --fill-missing, --drop classifier.2" in fill_drop.output
    assert "missing     classifier.2.weight  -             [10, 64]" in fill_drop.output
    cleaned = run(path, *net, "--num-classes", "3", "--reinit-mismatched", "--drop-unexpected", "--strict", *FAST)
    assert cleaned.exit_code == 0, cleaned.output
    assert "load: 4/6 model tensors loaded from 4; 0 missing, 0 unexpected, 0 mismatched" in cleaned.output, (
        cleaned.output
    )


def test_epoch_rows_schedulers_and_the_setup_tables_first(files, tmp_path):
    out = tmp_path / "curves.png"
    net = ["--arch", files["user"] + ":net", "--arch-arg", "hidden=800"]
    result = run(
        files["net"],
        *net,
        "--epochs",
        "3",
        "--freeze-epochs",
        "1",
        "--scheduler",
        "step",
        "--step-gamma",
        "0.5",
        "--plot",
        str(out),
        *FAST,
    )
    assert result.exit_code == 0, result.output
    text = result.output
    assert text.index("module        trainable") < text.index("train loss")  # freeze table, then training
    assert "frozen    1         0.01   step" in text and "unfrozen  2         0.001  step" in text
    header = next(line for line in text.splitlines() if "train loss" in line)
    epochs = text[text.index(header) : text.index("check  ")]
    labelled = [line.split()[:3] for line in epochs.splitlines()[2:] if line.strip()]
    assert labelled == [
        ["before", "0", "-"],
        ["frozen", "1", "0.01"],
        ["unfrozen", "2", "0.001"],
        ["unfrozen", "3", "0.0005"],
    ]
    assert f"curves drawn to {out}" in text and out.stat().st_size > 10_000
    data = json.loads(run(files["net"], *net, "--epochs", "2", "--json", *FAST).output)
    assert [(e["phase"], e["epoch"]) for e in data["epochs"]] == [("before", 0), ("train", 1), ("train", 2)]
    assert all(isinstance(e["heldout_loss"], float) for e in data["epochs"])
