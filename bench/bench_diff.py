"""Benchmark ``ckpt diff vgg16.pth --arch vgg16`` against the naive way, as whole processes.

The naive way: import torch and torchvision, build vgg16 on CPU, ``torch.load`` the checkpoint and
``load_state_dict(strict=False)``. ckpt runs cold (``--no-cache``: torch is imported to build the
target on the meta device) and warm (the target's signature comes from the on-disk cache: no torch).

Wall time and peak RSS are per process (``os.wait4``); each command runs ``--repeat`` times and the
median wall time and the largest peak RSS are reported. Usage:

    .venv/bin/python bench/bench_diff.py [--repeat 3]

The ~528 MB checkpoint is made once in bench/out/ (git-ignored).
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import OUT, bench_env, run_process, vgg16_pth  # noqa: E402

CACHE = os.path.join(OUT, "cache")

NAIVE = """
import sys, torch, torchvision
model = torchvision.models.vgg16(weights=None)
sd = torch.load(sys.argv[1], map_location="cpu", weights_only=True)
result = model.load_state_dict(sd, strict=False)
print(len(result.missing_keys), len(result.unexpected_keys))
"""


def measure(argv: list[str], env: dict[str, str]) -> tuple[float, float, int]:
    """(wall seconds, peak RSS in MB, exit code) of one process."""
    code, wall, rss, _ = run_process(argv, env)
    return wall, rss, code


def ckpt_executable() -> list[str]:
    found = os.path.join(os.path.dirname(sys.executable), "ckpt")
    return [found] if os.path.exists(found) else [shutil.which("ckpt") or "ckpt"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    ckpt_path = vgg16_pth()
    print(f"checkpoint: {ckpt_path} ({os.path.getsize(ckpt_path) / 2**20:.0f} MB); {os.cpu_count()} CPUs; "
          f"load average {os.getloadavg()[0]:.2f}")
    env = bench_env(CKPT_CACHE_DIR=CACHE)
    ckpt = ckpt_executable() + ["diff", ckpt_path, "--arch", "vgg16"]
    cases = {
        "naive (torch.load + load_state_dict)": [sys.executable, "-c", NAIVE, ckpt_path],
        "ckpt diff, cold (--no-cache)": ckpt + ["--no-cache"],
        "ckpt diff, warm cache": ckpt,
    }
    measure(ckpt, env)  # fills the cache (and the page cache) before anything is timed
    results: dict[str, tuple[float, float]] = {}
    for name, argv in cases.items():
        runs = [measure(argv, env) for _ in range(args.repeat)]
        results[name] = (statistics.median(r[0] for r in runs), max(r[1] for r in runs))
    naive_wall, naive_rss = results["naive (torch.load + load_state_dict)"]
    print(f"\n{'command':40} {'wall s':>8} {'peak RSS MB':>12} {'wall ratio':>11} {'RSS ratio':>10}")
    for name, (wall, rss) in results.items():
        print(f"{name:40} {wall:8.2f} {rss:12.0f} {wall / naive_wall:10.2f}x {rss / naive_rss:9.2f}x")
    cold_wall, cold_rss = results["ckpt diff, cold (--no-cache)"]
    warm_wall, warm_rss = results["ckpt diff, warm cache"]
    print("\ntargets:")
    print(f"  cold wall <= 0.65x naive: {cold_wall / naive_wall:.2f}x  {'ok' if cold_wall <= 0.65 * naive_wall else 'MISSED'}")
    print(f"  cold RSS  <= 0.5x naive:  {cold_rss / naive_rss:.2f}x  {'ok' if cold_rss <= 0.5 * naive_rss else 'MISSED'}")
    print(f"  warm wall < 0.3 s:        {warm_wall:.3f} s  {'ok' if warm_wall < 0.3 else 'MISSED'}")
    print(f"  warm RSS  < 60 MB:        {warm_rss:.1f} MB  {'ok' if warm_rss < 60 else 'MISSED'}")


if __name__ == "__main__":
    main()
