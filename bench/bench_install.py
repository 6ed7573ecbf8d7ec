"""Benchmark the core install and the pre-commit hooks, as a new user meets them.

1. ``pip install .`` (the core, no extras) into a fresh virtual environment: wall time, with pip's
   cache and with ``--no-cache-dir``, and what it adds to site-packages (a fresh venv's own pip and
   setuptools are counted apart).
2. The ``ckpt-scan`` hook (``language: python``) on a staged model file: ``pre-commit try-repo``
   twice (try-repo installs into a throwaway store every time; the second run has pip's cache
   warm), then ``pre-commit run`` from a config, first (installs into the store) and warm (reuses
   it), against ``ckpt-scan-system``, which runs the ``ckpt`` of step 1's environment.

Usage (needs git, pre-commit and the package index):

    .venv/bin/python bench/bench_install.py
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, os.path.join(ROOT, "tests"))
from test_precommit import git, hook_env, snapshot_checkout  # noqa: E402


def du_mb(path: str) -> float:
    total = 0
    for base, _, files in os.walk(path):
        total += sum(os.lstat(os.path.join(base, f)).st_size for f in files)
    return total / 2**20


def timed(
    cmd: list[str], cwd: str | None = None, env: dict[str, str] | None = None, ok: tuple[int, ...] = (0,)
) -> float:
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if proc.returncode not in ok:
        raise SystemExit(f"{' '.join(cmd)}: exit {proc.returncode}\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")
    return wall


def site_packages(venv: str) -> str:
    out = subprocess.run(
        [os.path.join(venv, "bin", "python"), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
        capture_output=True,
        text=True,
        check=True,
    )
    return out.stdout.strip()


def install(root: str, name: str, *pip_args: str) -> tuple[str, float, float, float]:
    """A fresh venv with the core: (venv, install seconds, site-packages MB before, after)."""
    venv = os.path.join(root, name)
    subprocess.run([sys.executable, "-m", "venv", venv], check=True)
    before = du_mb(site_packages(venv))
    wall = timed([os.path.join(venv, "bin", "pip"), "install", "-q", *pip_args, ROOT])
    return venv, wall, before, du_mb(site_packages(venv))


def main() -> None:
    print(f"{os.cpu_count()} CPUs; load average {os.getloadavg()[0]:.2f}")
    root = tempfile.mkdtemp(prefix="ckpt-bench-install-")
    try:
        venv, warm_wall, before, after = install(root, "core")
        _, cold_wall, _, _ = install(root, "core-nocache", "--no-cache-dir")
        sp = site_packages(venv)
        largest = sorted(
            (
                (du_mb(os.path.join(sp, d)), d)
                for d in os.listdir(sp)
                if os.path.isdir(os.path.join(sp, d)) and not d.endswith(("-info", "__pycache__"))
            ),
            reverse=True,
        )[:5]
        print("\ncore install (pip install ., no extras), fresh venv:")
        print(f"  wall, pip cache warm:  {warm_wall:6.1f} s   (target < 20 s)")
        print(f"  wall, --no-cache-dir:  {cold_wall:6.1f} s")
        print(
            f"  site-packages:         {after:6.1f} MB in all; {after - before:.1f} MB added by the install "
            f"(a fresh venv holds {before:.1f} MB: pip, setuptools)   (target < 60 MB)"
        )
        print("  largest:               " + ", ".join(f"{d} {mb:.1f} MB" for mb, d in largest))

        env = hook_env(os.path.join(root, "pc-home"))
        env["PATH"] = os.path.join(venv, "bin") + os.pathsep + env["PATH"]  # the -system hooks' ckpt
        snap = os.path.join(root, "snapshot")
        os.makedirs(snap)
        rev = snapshot_checkout(snap, env)
        work = os.path.join(root, "work")
        os.makedirs(work)
        git(work, "init", "-q", env=env)
        shutil.copy(os.path.join(ROOT, "fixtures", "tiny_cnn.pth"), os.path.join(work, "model.pth"))
        git(work, "add", "model.pth", env=env)
        pc = [sys.executable, "-m", "pre_commit"]
        rows = [
            (f"try-repo ckpt-scan, run {i}", timed(pc + ["try-repo", snap, "ckpt-scan"], work, env)) for i in (1, 2)
        ]
        rows.append(("try-repo ckpt-scan-system", timed(pc + ["try-repo", snap, "ckpt-scan-system"], work, env)))
        for hook in ("ckpt-scan", "ckpt-scan-system"):
            with open(os.path.join(work, ".pre-commit-config.yaml"), "w") as f:
                f.write(f"repos:\n- repo: {snap}\n  rev: {rev}\n  hooks:\n  - id: {hook}\n")
            rows.append((f"pre-commit run {hook}, first", timed(pc + ["run", "--all-files"], work, env)))
            rows.append((f"pre-commit run {hook}, warm", timed(pc + ["run", "--all-files"], work, env)))
        print("\npre-commit on one staged model file (whole pre-commit process):")
        for label, wall in rows:
            print(f"  {label:36} {wall:6.2f} s")
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
