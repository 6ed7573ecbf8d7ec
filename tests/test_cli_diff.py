"""``ckpt diff`` through Click's runner: output, exit codes 0/1/2, JSON, the plan file, bad input."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import save_file

from ckpt_tool.cli import main


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory, models: Any) -> Any:
    root = tmp_path_factory.mktemp("cli_diff")
    sd = models.state_dict("resnet18")
    torch.save(sd, root / "r18.pth")
    tuned = {k: v.clone() for k, v in sd.items()}
    tuned["fc.weight"] += 1.0
    torch.save(tuned, root / "r18_tuned.pth")
    dp = {f"module.{k}": v for k, v in sd.items()}  # what nn.DataParallel(model).state_dict() holds
    torch.save({"model_state_dict": dp, "epoch": 3}, root / "r18_dp.pth")
    save_file({k: v.contiguous() for k, v in sd.items()}, str(root / "r18.safetensors"))
    (root / "empty.pth").write_bytes(b"")
    (root / "garbage.pth").write_bytes(b"\x00\x01not a checkpoint" * 10)
    whole = (root / "r18.pth").read_bytes()
    (root / "truncated.pth").write_bytes(whole[: len(whole) // 3])
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("CKPT_CACHE_DIR", str(root / "cache"))
        yield root


def run(*args: Any) -> Any:
    return CliRunner().invoke(main, ["diff", *map(str, args)])


def test_loads_strictly_exit_0(files: Path) -> None:
    result = run(files / "r18.pth", "--arch", "resnet18")
    assert result.exit_code == 0, result.output
    assert "matched 122, missing 0, unexpected 0, shape mismatches 0, dtype differences 0" in result.stdout
    assert "fills 100.0% of the target's 11.70M elements" in result.stdout
    assert "(122 matched keys hidden; --all shows them)" in result.stdout
    assert "loads strictly" in result.stdout and "ckpt migrate" not in result.stdout


def test_head_mismatch_exit_1_with_plan(files: Path) -> None:
    result = run(files / "r18.pth", "--arch", "resnet18", "--arch-arg", "num_classes=10")
    assert result.exit_code == 1, result.output
    lines = result.stdout.splitlines()
    assert "target:     resnet18(num_classes=10) (122 tensors; signature " in result.stdout
    assert any(
        line.split() == ["shape", "fc.weight", "[1000,", "512]", "float32", "[10,", "512]", "float32"] for line in lines
    )
    assert "would not load strictly. Suggested fix:" in result.stdout
    assert (
        f"ckpt migrate {files}/r18.pth --arch resnet18 --arch-arg num_classes=10 --reinit-mismatched "
        f"-o {files}/r18.fixed.pth"
    ) in result.stdout


def test_json_report(files: Path) -> None:
    result = run(files / "r18.pth", "--arch", "resnet18", "--arch-arg", "num_classes=10", "--json")
    assert result.exit_code == 1
    data = json.loads(result.stdout)
    assert data["counts"]["shape_mismatches"] == 2 and data["counts"]["matched"] == 120
    assert data["counts"]["filled_share"] == pytest.approx(1 - 5130 / data["counts"]["target_numel"], abs=1e-6)
    assert data["loads_strictly"] is False and data["target_kind"] == "arch"
    assert data["plan"]["document"]["operations"] == [{"op": "reinit_mismatched"}]
    assert len(data["keys"]) == 122 and [r["name"] for r in data["rows"]] == ["fc.weight", "fc.bias"]
    assert list(data) == sorted(data)


def test_plan_out_and_dataparallel_nested(files: Path, tmp_path: Path) -> None:
    out = tmp_path / "plan.json"
    result = run(files / "r18_dp.pth", "--arch", "resnet18", "--plan-out", out)
    assert result.exit_code == 1
    assert "state dict at model_state_dict" in result.stdout
    assert "strip_prefix: every checkpoint key starts with 'module.' (saved from nn.DataParallel" in result.stdout
    assert f"--key model_state_dict --arch resnet18 --strip-prefix module. -o {files}/r18_dp.fixed.pth" in result.stdout
    assert result.stderr.strip().endswith(f"plan written to {out}")
    assert json.loads(out.read_text()) == {
        "version": 1,
        "source": str(files / "r18_dp.pth"),
        "key": "model_state_dict",
        "arch": "resnet18",
        "arch_args": {},
        "operations": [{"op": "strip_prefix", "prefix": "module."}],
    }


def test_checkpoint_vs_checkpoint_values_and_target_key(files: Path) -> None:
    result = run(files / "r18.pth", files / "r18_tuned.pth", "--values")
    assert result.exit_code == 0, result.output
    assert "values: 1 tensors changed, 121 unchanged" in result.stdout
    row = next(line for line in result.stdout.splitlines() if "fc.weight" in line)
    assert row.split()[0] == "matched" and row.split()[-2] == "1"  # max |diff|: +1.0 everywhere
    result = run(files / "r18_dp.pth", files / "r18.pth", "--key", "model_state_dict")
    assert result.exit_code == 1 and "--strip-prefix module." in result.stdout
    result = run(files / "r18.pth", files / "r18_dp.pth", "--target-key", "model_state_dict")
    assert result.exit_code == 1 and "--add-prefix module." in result.stdout


def test_safetensors_against_torch_file(files: Path) -> None:
    result = run(files / "r18.safetensors", files / "r18.pth")
    assert result.exit_code == 0, result.output
    assert "(safetensors, 122 tensors)" in result.stdout


def test_depth_and_all(files: Path) -> None:
    result = run(files / "r18.pth", "--arch", "resnet18", "--arch-arg", "num_classes=10", "--depth", "1")
    assert result.exit_code == 1
    row = next(line for line in result.stdout.splitlines() if line.startswith("shape"))
    assert row.split() == ["shape", "fc", "2", "shape", "513.0K", "5130"]
    assert "(6 matched modules hidden; --all shows them)" in result.stdout
    result = run(files / "r18.pth", "--arch", "resnet18", "--all")
    assert "layer1.{0..1}.conv1.weight" in result.stdout and "hidden" not in result.stdout


def test_help_documents_exit_codes() -> None:
    result = CliRunner().invoke(main, ["diff", "--help"])
    assert result.exit_code == 0
    for text in (
        "0  the checkpoint would load strictly",
        "1  it would not",
        "2  usage or input errors",
        "--plan-out",
        "--no-cache",
        "--values",
        "--depth",
        "--target-key",
    ):
        assert text in result.stdout


@pytest.mark.parametrize(
    "args, message",
    [
        (["{d}/empty.pth", "--arch", "resnet18"], "file is empty"),
        (["{d}/garbage.pth", "--arch", "resnet18"], "not a recognised checkpoint"),
        (["{d}/truncated.pth", "--arch", "resnet18"], "{d}/truncated.pth"),
        (["{d}/nope.pth", "--arch", "resnet18"], "nope.pth"),
        (["{d}/r18.pth", "--arch", "resnet18", "--key", "nokey"], "no state dict at --key 'nokey'"),
        (["{d}/r18.pth", "--arch", "resnet1800"], "not a torchvision model"),
        (["{d}/r18.pth", "--arch", "resnet18", "--arch-arg", "num_classes"], "is not NAME=VALUE"),
        (["{d}/r18.pth", "--arch", "resnet18", "--arch-arg", "bogus=1"], "cannot build it"),
        (["{d}/r18.pth", "{d}/r18.pth", "--arch", "resnet18"], "not both"),
        (["{d}/r18.pth"], "give a second checkpoint or --arch"),
        (["{d}/r18.pth", "--arch", "resnet18", "--values"], "--values compares two checkpoints"),
        (["{d}/r18.pth", "{d}/r18.pth", "--depth", "0"], "--depth 0"),
        (["{d}/r18.pth", "{d}/r18.pth", "--plan-out", "{d}/r18.pth"], "would overwrite the checkpoint"),
    ],
)
def test_bad_input_is_one_line_exit_2(files: Path, args: list[str], message: str) -> None:
    result = run(*[a.format(d=files) for a in args])
    assert result.exit_code == 2, result.output
    assert result.stdout == ""
    assert result.stderr.startswith("ckpt: error: ") and len(result.stderr.strip().splitlines()) == 1
    assert message.format(d=files) in result.stderr and "Traceback" not in result.stderr


def test_click_usage_error_is_exit_2(files: Path) -> None:
    result = run(files / "r18.pth", "--depth", "x")
    assert result.exit_code == 2 and "Invalid value for '--depth'" in result.stderr


def test_real_process_with_warm_cache_imports_no_torch(files: Path, tmp_path: Path) -> None:
    """The installed entry point, twice: the second run reads the signature from the cache, without torch."""
    wrapper = textwrap.dedent("""
        import atexit, sys
        atexit.register(lambda: sys.stderr.write(
            "IMPORTED " + repr(sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "torchvision"))) + "\\n"))
        from ckpt_tool.cli import main
        sys.argv = ["ckpt", *sys.argv[1:]]
        main()
    """)
    env = dict(os.environ, CKPT_CACHE_DIR=str(tmp_path / "cache"))
    argv = [
        sys.executable,
        "-c",
        wrapper,
        "diff",
        str(files / "r18.pth"),
        "--arch",
        "resnet18",
        "--arch-arg",
        "num_classes=10",
        "--arch-arg",
        "zero_init_residual=True",
    ]  # an argument the shipped table cannot state
    cold = subprocess.run(argv, env=env, capture_output=True, text=True)
    assert cold.returncode == 1 and "signature built, cached" in cold.stdout and "'torch'" in cold.stderr
    warm = subprocess.run(argv, env=env, capture_output=True, text=True)
    assert warm.returncode == 1 and "signature from cache" in warm.stdout
    assert warm.stderr.strip().splitlines()[-1] == "IMPORTED []"
    assert warm.stdout == cold.stdout.replace("signature built, cached", "signature from cache")
    no_cache = subprocess.run(argv + ["--no-cache"], env=env, capture_output=True, text=True)
    assert "signature built, --no-cache" in no_cache.stdout and "'torch'" in no_cache.stderr
