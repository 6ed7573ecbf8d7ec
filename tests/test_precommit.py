"""The pre-commit hooks for real: a temporary git repository, the `pre-commit` tool, staged model files.

pre-commit installs a `language: python` hook by pip-installing this repository, with its
dependencies from the package index, into a virtualenv of its own: the core only (click, tabulate,
numpy), never torch. The tests check that in the hook's environment torch cannot be imported, and
that the hook still passes a safe file and blocks a malicious one. Everything they stage is written
without torch (a committed fixture and the malicious pickles), so they run in CI's core-only
environment too. They need the package index: deselect them with ``-m "not network"``.

try-repo takes the HEAD commit plus changes to tracked files only, so the hooks are tried from a
snapshot of this checkout's working tree (tracked and untracked files, ignored ones left out).
"""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
import sys

import pytest
from scan_helpers import ROOT, write_malicious

pytestmark = [
    pytest.mark.torchfree,
    pytest.mark.skipif(
        shutil.which("git") is None
        or subprocess.run([sys.executable, "-m", "pre_commit", "--version"], capture_output=True).returncode != 0,
        reason="needs git and pre-commit",
    ),
]


def git(cwd: str, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["git", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=120)


def hook_env(home: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env.update(
        {
            "PRE_COMMIT_HOME": home,
            "GIT_AUTHOR_NAME": "t",
            "GIT_AUTHOR_EMAIL": "t@example.com",
            "GIT_COMMITTER_NAME": "t",
            "GIT_COMMITTER_EMAIL": "t@example.com",
        }
    )
    return env


def snapshot_checkout(dest: str, env: dict[str, str]) -> str:
    """This checkout's working tree as a one-commit repository; returns the commit."""
    listed = git(ROOT, "ls-files", "-co", "--exclude-standard", "-z").stdout.split("\0")
    for rel in filter(None, listed):
        src = os.path.join(ROOT, rel)
        if os.path.isfile(src):
            os.makedirs(os.path.dirname(os.path.join(dest, rel)), exist_ok=True)
            shutil.copy2(src, os.path.join(dest, rel))
    git(dest, "init", "-q", env=env)
    git(dest, "add", "-A", env=env)
    assert git(dest, "commit", "-qm", "snapshot", env=env).returncode == 0
    return git(dest, "rev-parse", "HEAD").stdout.strip()


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    base = tmp_path_factory.mktemp("precommit")
    env = hook_env(str(base / "pc-home"))
    snap = str(base / "ckpt-snapshot")
    os.makedirs(snap)
    rev = snapshot_checkout(snap, env)
    work = str(base / "work")
    os.makedirs(os.path.join(work, "models"))
    git(work, "init", "-q", env=env)
    shutil.copy(os.path.join(ROOT, "fixtures", "tiny_cnn.pth"), os.path.join(work, "models", "good.pth"))
    marker = str(base / "PWNED")
    evil = write_malicious(str(base / "m"), marker, with_torch=False)["global_os_system"]
    shutil.copy(evil, os.path.join(work, "models", "evil.pth"))
    return {"env": env, "snap": snap, "rev": rev, "work": work, "marker": marker, "home": str(base / "pc-home")}


def _try(setup: dict[str, str], hook: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "pre_commit", "try-repo", setup["snap"], hook],
        cwd=setup["work"],
        env=setup["env"],
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_hooks_file_defines_the_hooks():
    import yaml

    with open(os.path.join(ROOT, ".pre-commit-hooks.yaml")) as f:
        hooks = {h["id"]: h for h in yaml.safe_load(f)}
    assert hooks["ckpt-scan"]["entry"] == "ckpt scan" and hooks["ckpt-scan"]["language"] == "python"
    assert hooks["ckpt-validate"]["entry"] == "ckpt validate" and hooks["ckpt-validate"]["language"] == "python"
    import re

    pattern = re.compile(hooks["ckpt-scan"]["files"])
    assert all(pattern.search(n) for n in ("a.pt", "b.PTH", "c/pytorch_model.bin", "x.safetensors", "y.ckpt", "z.pkl"))
    assert not any(pattern.search(n) for n in ("README.md", "train.py", "model.json"))
    assert re.search(hooks["ckpt-validate"]["files"], "model.safetensors.index.json")


def _hook_pythons(setup: dict[str, str]) -> list[str]:
    """The interpreters of the hook environments in pre-commit's store (try-repo uses a throwaway store)."""
    return sorted(glob.glob(os.path.join(setup["home"], "*", "py_env-*", "bin", "python")))


@pytest.mark.network
def test_try_repo_passes_a_safe_file_and_refuses_a_malicious_one(setup):
    git(setup["work"], "add", "models/good.pth", env=setup["env"])
    safe = _try(setup, "ckpt-scan")
    assert safe.returncode == 0, safe.stdout + safe.stderr
    assert "ckpt scan (unsafe pickles in model files)" in safe.stdout and "Passed" in safe.stdout

    git(setup["work"], "add", "models/evil.pth", env=setup["env"])
    refused = _try(setup, "ckpt-scan")
    assert refused.returncode == 1, refused.stdout + refused.stderr
    assert "Failed" in refused.stdout
    assert "models/evil.pth: unsafe" in refused.stdout
    assert "os.system (GLOBAL in pickle 1 at byte 0)" in refused.stdout
    assert not os.path.exists(setup["marker"])
    git(setup["work"], "reset", "-q", env=setup["env"])


@pytest.mark.network
def test_git_commit_is_refused_for_the_malicious_file(setup):
    work, env = setup["work"], setup["env"]
    with open(os.path.join(work, ".pre-commit-config.yaml"), "w") as f:
        f.write(
            f"repos:\n- repo: {setup['snap']}\n  rev: {setup['rev']}\n"
            "  hooks:\n  - id: ckpt-scan\n  - id: ckpt-validate\n"
        )
    install = subprocess.run(
        [sys.executable, "-m", "pre_commit", "install"], cwd=work, env=env, capture_output=True, text=True, timeout=120
    )
    assert install.returncode == 0, install.stderr

    git(work, "add", ".pre-commit-config.yaml", "models/good.pth", env=env)
    ok = git(work, "commit", "-m", "add a safe model", env=env)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert "ckpt validate (safe, loadable, on policy)" in ok.stdout + ok.stderr
    # the hook's own environment (pre-commit's store): the core and its dependencies, no torch
    (python,) = _hook_pythons(setup)
    installed = subprocess.run(
        [python, "-m", "pip", "list", "--format=freeze"], capture_output=True, text=True, timeout=120
    ).stdout.lower()
    assert "ckpt-tool==" in installed and "click==" in installed and "numpy==" in installed
    assert "torch" not in installed and "safetensors" not in installed
    no_torch = subprocess.run([python, "-c", "import torch"], capture_output=True, text=True, timeout=60)
    assert no_torch.returncode == 1 and "No module named 'torch'" in no_torch.stderr

    git(work, "add", "models/evil.pth", env=env)
    refused = git(work, "commit", "-m", "add a model", env=env)
    output = refused.stdout + refused.stderr
    assert refused.returncode != 0
    assert "models/evil.pth: unsafe" in output and "runs shell commands" in output
    assert git(work, "log", "--format=%s").stdout.split("\n")[0] == "add a safe model"
    assert not os.path.exists(setup["marker"])
