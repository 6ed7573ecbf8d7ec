"""Every command without torch: what works, and the one-line refusal (exit 2) where torch is needed.

CI runs this module in a core-only environment (``pip install .``, no torch). Here, with torch
installed, the ``no_torch`` fixture makes torch unimportable and tells ckpt it is missing, so both
environments check the same behaviour. Inputs are written without torch: the committed fixtures,
and safetensors files laid out by hand from the shipped table.
"""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys

import numpy as np
import pytest
from click.testing import CliRunner
from conftest import FIXTURES, ROOT

from ckpt_tool import arch_table, torch_extra
from ckpt_tool.arch import target_signature
from ckpt_tool.cli import main
from ckpt_tool.errors import TorchMissingError
from ckpt_tool.validate import validate

pytestmark = pytest.mark.torchfree

TINY = os.path.join(FIXTURES, "tiny_cnn.pth")
EVIL = os.path.join(FIXTURES, "malicious", "global_os_system.pkl")
HINT = "(pip install 'ckpt-tool[torch]')"


@pytest.fixture
def no_torch(monkeypatch):
    """As if only the core were installed: ``import torch`` fails, and ckpt's checks say it is missing."""
    for name in ("torch", "torchvision", "safetensors"):
        monkeypatch.setitem(sys.modules, name, None)
    monkeypatch.setattr(torch_extra, "has", lambda module: module not in ("torch", "torchvision", "timm"))
    monkeypatch.setattr(arch_table, "has", torch_extra.has)
    monkeypatch.setattr(arch_table, "_installed_torchvision", lambda: None)


def run(*args: str):
    return CliRunner().invoke(main, list(args))


def write_safetensors(path: str, tensors: dict[str, tuple[int, ...]], seed: int = 0) -> str:
    """A float32 safetensors file of random values, laid out by hand (no torch, no safetensors package)."""
    rng = np.random.default_rng(seed)
    header, blobs, offset = {}, [], 0
    for key, shape in tensors.items():
        blob = rng.standard_normal(int(np.prod(shape)), dtype=np.float32).tobytes()
        header[key] = {"dtype": "F32", "shape": list(shape), "data_offsets": [offset, offset + len(blob)]}
        blobs.append(blob)
        offset += len(blob)
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(text)) + text + b"".join(blobs))
    return path


SQUEEZENET_10 = ("--arch", "squeezenet1_1", "--arch-arg", "num_classes=10")  # the layout squeezenet() writes


def squeezenet(tmp_path, name: str = "squeeze.safetensors", extra: bool = False, drop: str | None = None) -> str:
    """squeezenet1_1 with 10 classes (0.7M parameters), its layout taken from the shipped table."""
    sig = arch_table.lookup("squeezenet1_1", {"num_classes": 10})
    assert sig is not None
    shapes = {k: t.shape for k, t in sig.tensors.items() if k != drop}
    if extra:
        shapes["aux.weight"] = (3, 4)
    return write_safetensors(str(tmp_path / name), shapes)


def test_inspect_with_stats_scan_convert_and_diff(no_torch, tmp_path):
    inspected = run("inspect", TINY, "--stats")
    assert inspected.exit_code == 0, inspected.output
    assert "features.3.weight" in inspected.output and "std" in inspected.output

    assert run("scan", TINY).exit_code == 0
    refused = run("scan", EVIL)
    assert refused.exit_code == 1 and "os.system" in refused.output

    out = str(tmp_path / "tiny.safetensors")
    converted = run("convert", TINY, out)
    assert converted.exit_code == 0, converted.output
    same = run("diff", TINY, out, "--values")
    assert same.exit_code == 0, same.output
    assert "values: 0 tensors changed, 18 unchanged" in same.output


@pytest.mark.parametrize("name", sorted(os.listdir(os.path.join(FIXTURES, "malicious"))))
def test_scan_and_validate_refuse_every_committed_malicious_fixture(no_torch, name):
    path = os.path.join(FIXTURES, "malicious", name)
    scanned = run("scan", path)
    assert scanned.exit_code == 1 and f"{path}: unsafe" in scanned.output, scanned.output
    validated = run("validate", path)
    assert validated.exit_code == 1 and "unsafe" in validated.output and "1 failed" in validated.output


@pytest.mark.parametrize("name", ["tiny_cnn.pth", "tiny_cnn_dataparallel_nested.pth", "tiny_cnn.safetensors"])
def test_inspect_reports_match_the_golden_ones(no_torch, monkeypatch, name):
    monkeypatch.chdir(ROOT)
    result = run("inspect", f"fixtures/{name}", "--json")
    assert result.exit_code == 0, result.output
    with open(os.path.join(ROOT, "tests", "golden", f"inspect_{name.replace('.', '_')}.json"), encoding="utf-8") as f:
        assert json.loads(result.output) == json.load(f)
    assert run("validate", f"fixtures/{name}").exit_code == 0


def test_byte_moving_migrate(no_torch, tmp_path):
    out = str(tmp_path / "renamed.pth")
    result = run("migrate", TINY, "--rename", "^classifier\\.=head.", "--dtype", "bfloat16", "-o", out)
    assert result.exit_code == 0, result.output
    described = json.loads(run("inspect", out, "--json").output)
    keys = {row["name"]: row["dtype"] for row in described["rows"]}
    assert keys["head.fc1.weight"] == "bfloat16" and "classifier.fc1.weight" not in keys


def test_diff_against_a_shipped_signature(no_torch, tmp_path):
    path = squeezenet(tmp_path)
    ok = run("diff", path, *SQUEEZENET_10)
    assert ok.exit_code == 0, ok.output
    assert "loads strictly: load_state_dict(strict=True) would succeed" in ok.output
    wrong = run("diff", path, "--arch", "squeezenet1_1")  # the default 1000 classes
    assert wrong.exit_code == 1, wrong.output
    assert "classifier.1.weight" in wrong.output and "[1000, 512, 1, 1]" in wrong.output


def test_migrate_drop_unexpected_checks_the_written_headers(no_torch, tmp_path):
    src = squeezenet(tmp_path, extra=True)
    out = str(tmp_path / "clean.safetensors")
    args = ["migrate", src, *SQUEEZENET_10, "--drop-unexpected", "-o", out]
    result = run(*args)
    assert result.exit_code == 0, result.output
    assert (
        "checked: the written keys and shapes match squeezenet1_1 (torch is not installed: not loaded)" in result.output
    )
    report = json.loads(run(*args, "--force", "--json").output)
    assert report["ok"] and report["verification"]["method"] == "headers"
    assert report["verification"]["loads"]


def test_a_failed_header_check_exits_1(no_torch, tmp_path):
    src = squeezenet(tmp_path, extra=True)
    result = run("migrate", src, *SQUEEZENET_10, "-o", str(tmp_path / "out.safetensors"))
    assert result.exit_code == 1, result.output
    assert "check failed: squeezenet1_1" in result.output


def test_validate_arch_policy_from_the_table(no_torch, tmp_path):
    squeezenet(tmp_path, name="cls_a.safetensors")
    squeezenet(tmp_path, name="cls_b.safetensors", drop="classifier.1.bias")
    (tmp_path / "pyproject.toml").write_text(
        '[tool.ckpt.arch]\n"cls_*" = { arch = "squeezenet1_1", args = { num_classes = 10 } }\n'
    )
    report = validate(
        [str(tmp_path / "cls_a.safetensors"), str(tmp_path / "cls_b.safetensors")], config_dir=str(tmp_path)
    )
    checks = [{c.name: c for c in f.checks}["arch"] for f in report.files]
    assert checks[0].status == "pass" and "all 52 keys match" in checks[0].message
    assert checks[1].status == "fail" and "1 missing" in checks[1].message


@pytest.mark.parametrize(
    "args",
    [
        ["finetune-check", TINY, "--arch", "resnet18", "--num-classes", "10"],
        ["diff", TINY, "--arch", "fixtures.make_fixtures:tiny_cnn"],
        ["diff", TINY, "--arch", "resnet18", "--arch-arg", "dropout=0.2"],  # an argument the table cannot state
        ["diff", TINY, "--arch", "fasterrcnn_resnet50_fpn"],  # not a classification model: not in the table
        ["diff", TINY, "--arch", "resnet18", "--no-cache"],  # asks for a build
        ["migrate", TINY, "--arch", "fixtures/make_fixtures.py:tiny_cnn", "-o", "OUT"],
    ],
)
def test_paths_that_need_torch_stop_with_one_line(no_torch, tmp_path, monkeypatch, args):
    monkeypatch.setenv("CKPT_CACHE_DIR", str(tmp_path / "cache"))  # a cached signature would need no build
    args = [str(tmp_path / "out.pth") if a == "OUT" else a for a in args]
    result = run(*args)
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("ckpt: error: ") and lines[0].endswith(HINT), result.output
    assert not os.path.exists(tmp_path / "out.pth")


def test_initial_values_from_the_target_need_torch_before_anything_is_written(no_torch, tmp_path):
    src = squeezenet(tmp_path, drop="classifier.1.bias")
    out = tmp_path / "filled.safetensors"
    result = run("migrate", src, *SQUEEZENET_10, "--fill-missing", "-o", str(out))
    assert result.exit_code == 2 and result.output.strip().endswith(HINT), result.output
    assert "initialising 1 keys from --arch squeezenet1_1 needs torch" in result.output
    assert not out.exists()
    planned = run("migrate", src, *SQUEEZENET_10, "--fill-missing", "--dry-run")
    assert planned.exit_code == 0, planned.output  # a plan needs no values


def test_require_torch_is_a_typed_error(no_torch):
    with pytest.raises(TorchMissingError, match="finetune-check needs torch and torchvision, which are not"):
        torch_extra.require_torch("finetune-check", torchvision=True)
    assert not torch_extra.buildable("resnet18") and not torch_extra.buildable("pkg.mod:factory")


def test_a_typo_is_named_without_torchvision(no_torch):
    result = run("diff", TINY, "--arch", "resnet_18")
    assert result.exit_code == 2
    assert "not a torchvision classification model (did you mean resnet18" in result.output


def test_the_table_answers_without_importing_torch(tmp_path):
    """In a fresh process (torch installed or not): the signature comes from the table, torch stays unimported."""
    code = (
        "import sys; from ckpt_tool.arch import target_signature; "
        "s = target_signature('vgg16'); print(s.cache, len(s.tensors), 'torch' in sys.modules)"
    )
    env = {**os.environ, "CKPT_CACHE_DIR": str(tmp_path)}
    if arch_table._installed_torchvision() not in (None, arch_table.table_version()):
        pytest.skip("the installed torchvision is another release than the table's: it is built instead")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, env=env, timeout=60)
    assert out.stdout.split() == ["table", "32", "False"], out.stdout + out.stderr
    assert target_signature("vgg16").cache == "table"


def test_validate_stops_when_a_policy_needs_torch(no_torch, tmp_path, monkeypatch):
    model = squeezenet(tmp_path, name="cls.safetensors")
    (tmp_path / "pyproject.toml").write_text('[tool.ckpt.arch]\n"cls*" = "fixtures.make_fixtures:tiny_cnn"\n')
    monkeypatch.chdir(tmp_path)
    result = run("validate", model)
    assert result.exit_code == 2, result.output
    assert result.output.strip().splitlines()[-1].endswith(HINT)
