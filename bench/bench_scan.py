"""``ckpt scan`` of a ~550 MB vgg16 .pth against picklescan and torch.load(weights_only=True), as whole processes.

    python bench/bench_scan.py

picklescan is a benchmark-only dependency: ``pip install picklescan`` into the venv. Targets
(issue #6): at least as fast as picklescan, 10x faster than the torch load, peak RSS under 60 MB.
"""

from __future__ import annotations

import os
import shutil
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import CKPT, PYTHON, bench_env, measure, report, vgg16_pth  # noqa: E402


def main() -> None:
    path = vgg16_pth()
    env = bench_env()
    print(f"input: {path} ({os.path.getsize(path) / 2**20:.0f} MB), best of 3 runs each")
    runs = [measure("ckpt scan", [*CKPT, "scan", path], env=env)]
    picklescan = shutil.which("picklescan") or os.path.join(os.path.dirname(PYTHON), "picklescan")
    if os.path.exists(picklescan):
        runs.append(measure("picklescan -p", [picklescan, "-p", path], env=env))
    else:
        print("picklescan is not installed (pip install picklescan): skipped")
    torch_load = f"import torch; torch.load({path!r}, weights_only=True)"
    runs.append(measure("torch.load(weights_only=True)", [PYTHON, "-c", torch_load], env=env))
    runs.append(measure("python -c pass (interpreter start-up)", [PYTHON, "-c", "pass"], env=env))
    report(runs, runs[0])
    ours = runs[0]
    for other in runs[1:-1]:
        print(f"{other.label} / ckpt scan: {other.wall_s / ours.wall_s:.1f}x wall time")
    print(f"ckpt scan peak RSS: {ours.peak_rss_mb:.1f} MB (target < 60 MB)")


if __name__ == "__main__":
    main()
