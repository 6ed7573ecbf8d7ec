"""`ckpt scan` / `ckpt validate` through Click: output, formats, exit codes, errors."""

from __future__ import annotations

import json
import os

import pytest
from click.testing import CliRunner
from scan_helpers import write_malicious

from ckpt_tool.cli import main


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    import torch
    import torchvision
    from safetensors.torch import save_file

    out = tmp_path_factory.mktemp("cli_scan")
    torch.manual_seed(0)
    model = torchvision.models.squeezenet1_0(weights=None, num_classes=10)
    paths = write_malicious(str(out / "bad"), str(out / "MARKER"), with_torch=False)
    os.makedirs(out / "good" / "models")
    paths["good_pth"] = str(out / "good" / "models" / "cls_squeeze.pth")
    torch.save(model.state_dict(), paths["good_pth"])
    paths["good_st"] = str(out / "good" / "models" / "cls_squeeze.safetensors")
    save_file(model.state_dict(), paths["good_st"])
    paths["full"] = str(out / "full.pth")
    torch.save(model, paths["full"])
    paths["marker"] = str(out / "MARKER")
    return paths


def run(*args: str) -> tuple[int, str, str]:
    result = CliRunner().invoke(main, list(args))
    return result.exit_code, result.stdout, result.stderr


def test_safe_files_exit_0_with_a_table(files):
    code, out, err = run("scan", files["good_pth"], files["good_st"])
    assert code == 0, out + err
    lines = out.splitlines()
    assert lines[0].split() == ["file", "format", "verdict", "offending"]
    assert any(files["good_pth"] in line and "torch-zip" in line and " safe " in line for line in lines)
    assert lines[-1] == "2 files scanned: 2 safe"


def test_unsafe_file_exits_1_and_names_the_global(files):
    code, out, _ = run("scan", files["global_os_system"], files["good_st"])
    assert code == 1
    assert f"{files['global_os_system']}: unsafe" in out
    assert "unsafe     os.system (GLOBAL in pickle 1 at byte 0): runs shell commands" in out
    assert out.splitlines()[-1] == "2 files scanned: 1 unsafe, 1 safe"
    assert not os.path.exists(files["marker"])


def test_directory_is_walked_recursively(files):
    code, out, _ = run("scan", os.path.dirname(files["global_os_system"]), "--json")
    data = json.loads(out)
    assert code == 1
    assert data["counts"] == {"unsafe": 14}
    assert len(data["files"]) == 14


def test_json_report(files):
    code, out, _ = run("scan", files["stack_global"], "--json")
    data = json.loads(out)
    assert code == 1 and data["ok"] is False
    [f] = data["files"]
    assert f["verdict"] == "unsafe" and f["format"] == "pickle" and f["globals"] == ["os.system"]
    assert f["findings"][0] == {
        "name": "os.system",
        "opcode": "STACK_GLOBAL",
        "position": 14,
        "reason": f["findings"][0]["reason"],
        "severity": "unsafe",
        "stream": "pickle 1",
    }
    assert f["calls"] == ["REDUCE os.system"]


def test_sarif_output(files):
    code, out, _ = run("scan", files["inst_opcode"], "--format", "sarif")
    log = json.loads(out)
    assert code == 1
    assert log["version"] == "2.1.0" and log["runs"][0]["tool"]["driver"]["name"] == "ckpt"
    assert log["runs"][0]["results"][0]["properties"]["opcode"] == "INST"


def test_full_model_is_suspicious_until_allowed(files):
    code, out, _ = run("scan", files["full"])
    assert code == 1 and "suspicious" in out and "torchvision.models.squeezenet.SqueezeNet" in out
    code, out, _ = run("scan", files["full"], "--allow", "torchvision.models.*", "--allow", "torch.nn.modules.*")
    assert code == 0, out


def test_allow_never_unblocks_a_denied_name(files):
    code, _, _ = run("scan", files["global_os_system"], "--allow", "os.system")
    assert code == 1


@pytest.mark.parametrize(
    "args, message",
    [
        (("scan", "/nonexistent/model.pth"), "ckpt: error: /nonexistent/model.pth: no such file or directory"),
        (("scan", "x.pth", "--json", "--format", "sarif"), "--json and --format are exclusive"),
        (("validate", "/nonexistent/model.pth"), "no such file or directory"),
    ],
)
def test_usage_and_input_errors_exit_2_in_one_line(files, args, message, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "x.pth").write_bytes(b"")
    code, out, err = run(*args)
    assert code == 2
    assert message in err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err


def test_no_paths_and_bad_allow_are_usage_errors():
    code, _, err = run("scan")
    assert code == 2 and "Missing argument" in err
    code, _, err = run("scan", ".", "--allow", "bad")
    assert code == 2 and "--allow 'bad' is not a dotted name" in err


def test_broken_file_exits_1(tmp_path):
    path = tmp_path / "empty.pt"
    path.write_bytes(b"")
    code, out, _ = run("scan", str(path))
    assert code == 1 and "broken" in out and "file is empty" in out


def test_validate_table_and_policies_from_pyproject(files, monkeypatch):
    root = os.path.dirname(os.path.dirname(files["good_pth"]))
    with open(os.path.join(root, "pyproject.toml"), "w") as f:
        f.write(
            '[tool.ckpt]\nrequire-format = "safetensors"\n'
            '[tool.ckpt.arch]\n"models/cls_*" = { arch = "squeezenet1_0", args = { num_classes = 10 } }\n'
        )
    monkeypatch.chdir(root)
    code, out, err = run("validate", "models")
    assert code == 1, err
    assert "policies from " + os.path.join(root, "pyproject.toml") in out
    assert out.splitlines()[-1].endswith("1 failed")
    rows = [line.split() for line in out.splitlines()]
    assert ["format", "fail", "torch-zip,", "the", "project", "requires", "safetensors"] in [r[-7:] for r in rows]
    code, out, _ = run("validate", "models/cls_squeeze.safetensors", "--json")
    data = json.loads(out)
    assert code == 0 and data["ok"] is True
    assert [c["name"] for c in data["files"][0]["checks"]] == ["scan", "loads", "format", "arch"]


def test_validate_malicious_exits_1(files, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code, out, _ = run("validate", files["nested_loads"])
    assert code == 1 and "unsafe: pickle.loads" in out
    assert not os.path.exists(files["marker"])


def test_globals_flag_lists_every_global_and_call(files):
    code, out, _ = run("scan", files["good_pth"])
    assert "globals:" not in out
    code, out, _ = run("scan", files["good_pth"], "--globals")
    assert code == 0
    # squeezenet has no BatchNorm, so no int64 buffers (LongStorage)
    assert "  globals: collections.OrderedDict, torch.FloatStorage, torch._utils._rebuild_tensor_v2\n" in out
    assert "REDUCE torch._utils._rebuild_tensor_v2 x52" in out
