"""``ckpt inspect`` through Click's runner: exact output, exit codes, bad input."""

from __future__ import annotations

import json
import os

import pytest
from click.testing import CliRunner
from conftest import FIXTURES, rewrite_zip, tiny_model

from ckpt_tool.cli import main

TINY = os.path.join(FIXTURES, "tiny_cnn.pth")
NESTED = os.path.join(FIXTURES, "tiny_cnn_dataparallel_nested.pth")


def run(*args: str):
    return CliRunner().invoke(main, list(args))


@pytest.mark.torchfree
def test_summary_and_table():
    result = run("inspect", TINY)
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert lines[1].split() == ["format", "torch-zip"]
    assert "tensors         18" in result.output
    assert "values          2,364" in result.output and "parameters" not in result.output
    assert "bytes by dtype  float32 9.2 KB, int64 16 B" in result.output
    row = next(line for line in lines if line.startswith("features.3.weight"))
    assert row.split() == ["features.3.weight", "[16,", "8,", "3,", "3]", "float32", "1,152", "4.5", "KB"]


@pytest.mark.torchfree
def test_nested_dataparallel_summary():
    result = run("inspect", NESTED)
    assert result.exit_code == 0
    assert "state dict                   'model_state_dict'" in result.output
    assert "common prefix                module." in result.output
    assert "extra: epoch                 3" in result.output
    assert "<optimizer state: 12 tensors" in result.output


@pytest.mark.torchfree
def test_depth_rolls_up_by_module():
    result = run("inspect", TINY, "--depth", "1")
    assert result.exit_code == 0
    rows = {
        line.split()[0]: line.split()[1:]
        for line in result.output.splitlines()
        if line.startswith(("features", "classifier"))
    }
    assert rows == {
        "features": ["14", "1,490", "5.8", "KB", "float32,int64"],
        "classifier": ["4", "874", "3.4", "KB", "float32"],
    }


@pytest.mark.torchfree
def test_filter_and_json():
    result = run("inspect", TINY, "--filter", r"^classifier\.fc2", "--json")
    assert result.exit_code == 0
    data = json.loads(result.output)
    assert [r["name"] for r in data["rows"]] == ["classifier.fc2.weight", "classifier.fc2.bias"]
    assert data["tensors"] == 18 and data["format"] == "torch-zip" and data["parameters"] == 2364
    assert data["rows"][0]["shape"] == [10, 32]


def test_stats_match_numpy_and_flag_nonfinite(tmp_path):
    import torch

    sd = tiny_model().state_dict()
    result = run("inspect", TINY, "--stats", "--json", "--filter", "fc1.weight")
    stats = json.loads(result.output)["rows"][0]["stats"]
    w = torch.load(TINY, weights_only=True)["classifier.fc1.weight"].double()
    assert stats["min"] == pytest.approx(w.min().item()) and stats["max"] == pytest.approx(w.max().item())
    assert stats["mean"] == pytest.approx(w.mean().item()) and stats["std"] == pytest.approx(w.std().item())
    assert result.exit_code == 0
    sd["classifier.fc2.bias"][0] = float("nan")
    sd["classifier.fc2.bias"][1] = float("inf")
    bad = tmp_path / "nan.pth"
    torch.save(sd, bad)
    result = run("inspect", str(bad), "--stats")
    assert result.exit_code == 1
    row = next(line for line in result.output.splitlines() if line.startswith("classifier.fc2.bias"))
    assert row.split()[-2:] == ["1", "1"]


@pytest.mark.torchfree
def test_key_option_and_bad_key():
    assert run("inspect", NESTED, "--key", "model_state_dict").exit_code == 0
    result = run("inspect", NESTED, "--key", "optimizer")
    assert result.exit_code == 2
    assert result.output.startswith("ckpt: error: ") and "candidates: 'model_state_dict'" in result.output
    assert "Traceback" not in result.output


@pytest.mark.torchfree
@pytest.mark.parametrize(
    "content, message",
    [(b"", "file is empty"), (b"PK\x03\x04junk", "corrupt zip"), (b"\x80\x02}q\x00(X", "truncated|past the end")],
)
def test_bad_files_give_one_line_and_exit_2(tmp_path, content, message):
    import re

    path = tmp_path / "bad.pth"
    path.write_bytes(content)
    result = run("inspect", str(path))
    assert result.exit_code == 2
    assert len(result.output.strip().splitlines()) == 1
    assert re.search(message, result.output) and str(path) in result.output


@pytest.mark.torchfree
def test_missing_file_and_bad_options(tmp_path):
    result = run("inspect", str(tmp_path / "nope.pth"))
    assert result.exit_code == 2 and "no such file" in result.output
    assert run("inspect", TINY, "--depth", "0").exit_code == 2
    result = run("inspect", TINY, "--filter", "([")
    assert result.exit_code == 2 and "not a regular expression" in result.output


@pytest.mark.torchfree
def test_lfs_pointer_message(tmp_path):
    path = tmp_path / "model.bin"
    path.write_text("version https://git-lfs.github.com/spec/v1\noid sha256:abc\nsize 99\n")
    result = run("inspect", str(path))
    assert result.exit_code == 2
    assert (
        "git-lfs pointer (oid sha256:abc, 99 bytes); the real file was not fetched (run `git lfs pull`" in result.output
    )


@pytest.mark.torchfree
def test_internal_errors_exit_3_without_traceback(monkeypatch):
    import ckpt_tool.inspect as inspect_lib

    def boom(*a, **k):
        raise RuntimeError("kaput")

    monkeypatch.setattr(inspect_lib, "inspect_checkpoint", boom)
    result = run("inspect", TINY)
    assert result.exit_code == 3 and "internal error: RuntimeError: kaput" in result.output
    assert "Traceback" not in result.output


def test_malicious_pickle_is_not_executed(tmp_path):
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    import pickle

    import torch

    good = tmp_path / "good.pth"
    torch.save({"w": torch.zeros(2)}, good)
    evil = tmp_path / "evil.pth"
    payload = pickle.dumps({"w": Payload()}, protocol=2)
    rewrite_zip(good, evil, lambda name, data: payload if name.endswith("data.pkl") else data)
    for args in (["inspect", str(evil)], ["inspect", str(evil), "--stats"], ["inspect", str(evil), "--json"]):
        result = run(*args)
        assert result.exit_code in (0, 1, 2)
    assert not marker.exists()
    result = run("inspect", str(evil))
    assert "posix.system" in result.output or "os.system" in result.output
    assert "would run when loaded with torch.load(weights_only=False); ckpt ran nothing" in result.output
    assert "would run when loaded" not in run("inspect", TINY).output


@pytest.mark.torchfree
def test_cli_start_up_imports_only_the_command_it_runs():
    import subprocess
    import sys

    code = """
import sys
from click.testing import CliRunner
from ckpt_tool.cli import main
result = CliRunner().invoke(main, ["inspect", sys.argv[1]])
assert result.exit_code == 0, result.output
print(sorted(m for m in sys.modules if m.startswith("ckpt_tool.commands.") or m in ("torch", "numpy", "tabulate")))
"""
    out = subprocess.run([sys.executable, "-c", code, TINY], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "['ckpt_tool.commands.inspect_cmd', 'ckpt_tool.commands.options', 'tabulate']"
    assert run("--help").output.count("\n  ") >= 7  # every command listed in --help
    assert "No such command 'nope'" in run("nope").output and run("nope").exit_code == 2


@pytest.mark.torchfree
@pytest.mark.parametrize("name", ["tiny_cnn.pth", "tiny_cnn_dataparallel_nested.pth", "tiny_cnn.safetensors"])
def test_json_report_matches_golden(name, monkeypatch):
    """The --json report of each committed fixture, field for field (regenerate on purpose only)."""
    from conftest import ROOT

    monkeypatch.chdir(ROOT)
    result = run("inspect", f"fixtures/{name}", "--json")
    assert result.exit_code == 0
    golden = os.path.join(ROOT, "tests", "golden", f"inspect_{name.replace('.', '_')}.json")
    with open(golden, encoding="utf-8") as f:
        assert json.loads(result.output) == json.load(f)
