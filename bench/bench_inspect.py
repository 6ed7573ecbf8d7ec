"""``ckpt inspect`` against ``torch.load(weights_only=True)`` on a ~550 MB vgg16 state dict.

Run: ``python bench/bench_inspect.py``. Targets: at least 20x faster, under 60 MB peak RSS, and a
cost that follows the number of tensors rather than their bytes (a second file with the same keys
and 1/64 of the bytes shows it).
"""

from __future__ import annotations

import os
import subprocess
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import CKPT, OUT, PYTHON, measure, report, vgg16_pth  # noqa: E402


def small_twin() -> str:
    """The same 32 keys as vgg16 with tiny tensors: same tensor count, 1/64+ fewer bytes."""
    path = os.path.join(OUT, "vgg16_small_twin.pth")
    if not os.path.exists(path):
        code = (
            "import torch, torchvision; sd = torchvision.models.vgg16(weights=None).state_dict(); "
            "torch.save({k: v.flatten()[: max(1, v.numel() // 64)].clone() for k, v in sd.items()}, "
            f"{path!r})"
        )
        subprocess.run([PYTHON, "-c", code], check=True)
    return path


def main() -> None:
    big = vgg16_pth()
    twin = small_twin()
    print(f"file: {big} ({os.path.getsize(big) / 1e6:.0f} MB); twin: {os.path.getsize(twin) / 1e6:.1f} MB")
    load = measure(
        "torch.load(weights_only=True)",
        [PYTHON, "-c", f"import torch; torch.load({big!r}, weights_only=True, map_location='cpu')"],
    )
    ours = measure("ckpt inspect vgg16.pth", CKPT + ["inspect", big])
    ours_json = measure("ckpt inspect vgg16.pth --json", CKPT + ["inspect", big, "--json"])
    twin_run = measure("ckpt inspect twin (same keys, 1/64 bytes)", CKPT + ["inspect", twin])
    report([load, ours, ours_json, twin_run], load)
    print(
        f"speed-up vs torch.load: {load.wall_s / ours.wall_s:.1f}x (target >= 20x); "
        f"peak RSS {ours.peak_rss_mb:.1f} MB (target < 60 MB); "
        f"big/twin wall {ours.wall_s / twin_run.wall_s:.2f} (1.0 = cost independent of bytes)"
    )


if __name__ == "__main__":
    main()
