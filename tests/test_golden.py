"""Golden ``--json`` reports: every field of inspect, diff, scan, validate and migrate, on committed fixtures.

A change in a report shows up here as a diff against ``tests/golden/``. When the change is
intended, regenerate the files and review the diff before committing:

    CKPT_UPDATE_GOLDEN=1 pytest tests/test_golden.py
"""

from __future__ import annotations

import json
import os
import shutil

import pytest
from click.testing import CliRunner
from conftest import ROOT

from ckpt_tool.cli import main

GOLDEN = os.path.join(ROOT, "tests", "golden")
UPDATE = bool(os.environ.get("CKPT_UPDATE_GOLDEN"))

# golden name -> (arguments, expected exit code); paths are relative to the directory the case runs in
CASES = {
    "inspect_tiny_cnn_pth": (["inspect", "fixtures/tiny_cnn.pth", "--json"], 0),
    "inspect_tiny_cnn_dataparallel_nested_pth": (["inspect", "fixtures/tiny_cnn_dataparallel_nested.pth", "--json"], 0),
    "inspect_tiny_cnn_safetensors": (["inspect", "fixtures/tiny_cnn.safetensors", "--json"], 0),
    "diff_dataparallel_vs_arch": (
        [
            "diff",
            "fixtures/tiny_cnn_dataparallel_nested.pth",
            "--arch",
            "fixtures/make_fixtures.py:tiny_cnn",
            "--arch-arg",
            "num_classes=4",
            "--no-cache",
            "--json",
        ],
        1,
    ),
    "diff_pth_vs_safetensors_values": (
        ["diff", "fixtures/tiny_cnn.pth", "fixtures/tiny_cnn.safetensors", "--values", "--all", "--json"],
        0,
    ),
    "scan_malicious": (["scan", "fixtures/malicious", "fixtures/tiny_cnn.pth", "--json"], 1),
    # in the docs' example inputs, whose pyproject.toml holds [tool.ckpt] policies
    "validate_policies": (["validate", "models/tiny_cnn.pth", "models/tiny_cnn.safetensors", "--json"], 1),
    "migrate_strip_reinit": (
        [
            "migrate",
            "fixtures/tiny_cnn_dataparallel_nested.pth",
            "--key",
            "model_state_dict",
            "--strip-prefix",
            "module.",
            "--arch",
            "fixtures/make_fixtures.py:tiny_cnn",
            "--arch-arg",
            "num_classes=4",
            "--reinit-mismatched",
            "--seed",
            "0",
            "-o",
            "tiny_cnn_4.safetensors",
            "--json",
        ],
        0,
    ),
}


def _workdir(tmp_path, name: str, request) -> str:
    """Cases run in a fresh directory holding ``fixtures/`` (validate: the docs' example inputs)."""
    work = tmp_path / "work"
    if name.startswith("validate"):
        shutil.copytree(request.getfixturevalue("example_inputs"), work)
    else:
        shutil.copytree(os.path.join(ROOT, "fixtures"), work / "fixtures")
    return str(work)


def _masked(value, work: str):
    """The run's own directory becomes ``<work>``: the golden holds what is the same on every machine."""
    if isinstance(value, dict):
        return {k: _masked(v, work) for k, v in value.items()}
    if isinstance(value, list):
        return [_masked(v, work) for v in value]
    if isinstance(value, str):
        return value.replace(work, "<work>")
    return value


# the cases that build a target architecture need torch
NEEDS_TORCH = {"diff_dataparallel_vs_arch", "migrate_strip_reinit", "validate_policies"}


@pytest.mark.parametrize(
    "name", [pytest.param(n, marks=[pytest.mark.torch] if n in NEEDS_TORCH else []) for n in sorted(CASES)]
)
def test_json_report_matches_golden(name, tmp_path, monkeypatch, request):
    args, code = CASES[name]
    work = _workdir(tmp_path, name, request)
    monkeypatch.chdir(work)
    monkeypatch.setenv("CKPT_CACHE_DIR", str(tmp_path / "cache"))
    result = CliRunner().invoke(main, args)
    assert result.exit_code == code, result.output
    report = _masked(json.loads(result.stdout), os.path.realpath(work))
    assert report["schema_version"] == 1
    path = os.path.join(GOLDEN, f"{name}.json")
    if UPDATE:
        with open(path, "w", encoding="utf-8") as f:
            f.write(json.dumps(report, indent=2, sort_keys=True) + "\n")
    with open(path, encoding="utf-8") as f:
        assert report == json.load(f), f"{name}: --json output differs from tests/golden/{name}.json"
