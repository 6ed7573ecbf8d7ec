"""Shared benchmark helpers: whole-process wall time and peak RSS, and the large test inputs."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from dataclasses import dataclass

HERE = os.path.dirname(os.path.abspath(__file__))
OUT = os.path.join(HERE, "out")
PYTHON = sys.executable
CKPT = [PYTHON, "-m", "ckpt_tool.cli"]


@dataclass(frozen=True)
class Run:
    label: str
    wall_s: float
    peak_rss_mb: float
    returncode: int


def bench_env(**extra: str) -> dict[str, str]:
    """The environment for timed runs: byte-code caching on, as for any installed package."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
    env.update(extra)
    return env


def run_process(
    cmd: list[str], env: dict[str, str] | None = None, capture: bool = False
) -> tuple[int, float, float, bytes]:
    """One whole process: (exit code, wall seconds, peak RSS in MB, stdout if captured).

    Peak RSS comes from ``wait4``'s rusage of that one child (kilobytes on Linux).
    """
    start = time.perf_counter()
    proc = subprocess.Popen(
        cmd,
        stdout=subprocess.PIPE if capture else subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        env=env if env is not None else bench_env(),
    )
    out = proc.stdout.read() if proc.stdout else b""
    err = proc.stderr.read() if proc.stderr else b""
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - start
    code = os.waitstatus_to_exitcode(status)
    if code not in (0, 1):
        raise SystemExit(f"{' '.join(cmd[:4])} ...: exit {code}\n{err.decode(errors='replace')}")
    return code, wall, usage.ru_maxrss / 1024, out


def measure(label: str, cmd: list[str], repeat: int = 3, env: dict[str, str] | None = None) -> Run:
    """Run ``cmd`` ``repeat`` times as a whole process; keep the fastest wall time and its peak RSS."""
    best: Run | None = None
    for _ in range(repeat):
        code, wall, rss, _ = run_process(cmd, env)
        run = Run(label, wall, rss, code)
        if best is None or run.wall_s < best.wall_s:
            best = run
    assert best is not None
    return best


def fresh(label: str, cmd: list[str], output: str, repeat: int = 3) -> Run:
    """Like ``measure``, but the output (a file or a directory) is deleted before each run (untimed):
    replacing an existing 550 MB file costs its unlink, which would be charged to whichever command
    ran second."""
    import shutil

    best: Run | None = None
    for _ in range(repeat):
        if os.path.isdir(output):
            shutil.rmtree(output)
        elif os.path.exists(output):
            os.unlink(output)
        run = measure(label, cmd, repeat=1)
        best = run if best is None or run.wall_s < best.wall_s else best
    assert best is not None
    return best


def report(runs: list[Run], baseline: Run) -> None:
    print(f"{'command':<44} {'wall s':>8} {'peak RSS MB':>12} {'wall ratio':>11} {'RSS ratio':>10}")
    for r in runs:
        print(
            f"{r.label:<44} {r.wall_s:>8.3f} {r.peak_rss_mb:>12.1f} {r.wall_s / baseline.wall_s:>11.3f} "
            f"{r.peak_rss_mb / baseline.peak_rss_mb:>10.3f}"
        )


def torchvision_pth(name: str) -> str:
    """A torchvision model's state dict (random weights) saved with torch.save, made once in bench/out/."""
    path = os.path.join(OUT, f"{name}.pth")
    if not os.path.exists(path):
        os.makedirs(OUT, exist_ok=True)
        code = (
            "import torch, torchvision; torch.manual_seed(0); "
            f"torch.save(torchvision.models.get_model({name!r}, weights=None).state_dict(), {path + '.tmp'!r})"
        )
        subprocess.run([PYTHON, "-c", code], check=True)
        os.replace(path + ".tmp", path)
    return path


def vgg16_pth() -> str:
    """The ~550 MB vgg16 state dict the issues' targets are stated for."""
    return torchvision_pth("vgg16")
