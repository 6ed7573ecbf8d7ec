"""Nothing runs: every payload is live under a real load, and no ckpt command ever runs one.

Each malicious fixture creates a marker file if it is executed. We first prove that a real
``torch.load(weights_only=False)`` / ``pickle.load`` does create it (so the fixture is not a dud),
then run every registered command on every fixture and check the marker never appears.
"""

from __future__ import annotations

import os
import subprocess
import sys

import click
import pytest
from click.testing import CliRunner
from scan_helpers import PYTHON, load_for_real, write_malicious

from ckpt_tool.cli import main


@pytest.fixture(scope="module")
def payloads(tmp_path_factory):
    out = tmp_path_factory.mktemp("payloads")
    marker = out / "PWNED"
    return write_malicious(str(out / "files"), str(marker)), marker, out


def test_every_payload_is_live_under_a_real_load(payloads):
    paths, marker, out = payloads
    for name, path in paths.items():
        if marker.exists():
            marker.unlink()
        load_for_real(path, str(out))
        assert marker.exists(), f"{name}: the fixture did not run under a real load, so it proves nothing"
    marker.unlink()


def _args(command: str, path: str, out: str) -> list[list[str]]:
    """How to call each command on a file; a command added later gets a generic call."""
    return {
        "scan": [[path]],
        "validate": [[path]],
        "inspect": [[path]],
        "diff": [[path, path], [path, "--arch", "squeezenet1_0"]],
        "migrate": [
            [path, "--strip-prefix", "module.", "--dry-run"],
            [path, "--strip-prefix", "module.", "-o", os.path.join(out, "migrated.pth")],
        ],
        "convert": [[path, os.path.join(out, "converted.safetensors")]],
        # loads the tensors into a real model and trains a step: the deepest reader path there is
        "finetune-check": [[path, "--arch", "squeezenet1_0", "--data", "synthetic:2", "--image-size", "32"]],
    }.get(command, [[path]])


def test_no_command_runs_a_payload(payloads, tmp_path):
    paths, marker, _ = payloads
    assert not marker.exists()
    runner = CliRunner()
    commands = main.list_commands(click.Context(main))
    assert {"scan", "validate", "inspect"} <= set(commands)
    for command in commands:
        for name, path in paths.items():
            for args in _args(command, path, str(tmp_path)):
                result = runner.invoke(main, [command, *args])
                assert result.exit_code in (0, 1, 2), (command, name, result.output, result.exception)
                assert not marker.exists(), f"ckpt {command} {' '.join(args)} ran the {name} payload"
                if command == "scan":
                    assert result.exit_code == 1 and "unsafe" in result.stdout, (name, result.stdout)


def test_scan_does_not_import_torch(payloads):
    paths, marker, out = payloads
    code = (
        "import sys\n"
        "from ckpt_tool.cli import main\n"
        f"rc = main(['scan', *{sorted(paths.values())!r}], standalone_mode=False)\n"
        "loaded = sorted(m for m in sys.modules if m == 'torch' or m.startswith(('torch.', 'torchvision')))\n"
        "print('RC', rc, 'TORCH', loaded)\n"
    )
    result = subprocess.run([PYTHON, "-c", code], cwd=str(out), capture_output=True, text=True, timeout=120)
    assert "RC 1 TORCH []" in result.stdout, result.stdout + result.stderr
    assert not marker.exists()


def test_validate_without_values_or_arch_does_not_import_torch(payloads, tmp_path):
    paths, _, _ = payloads
    code = (
        "import sys\n"
        "from ckpt_tool.cli import main\n"
        f"rc = main(['validate', {paths['torch_zip_payload']!r}, {paths['stack_global']!r}], standalone_mode=False)\n"
        "print('RC', rc, 'TORCH', 'torch' in sys.modules)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=str(tmp_path), capture_output=True, text=True, timeout=120
    )
    assert "RC 1 TORCH False" in result.stdout, result.stdout + result.stderr
