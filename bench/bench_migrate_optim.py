"""A resnet50 training checkpoint with Adam state (about 300 MB) migrated with a rename and a new head.

Run: ``python bench/bench_migrate_optim.py``. The input is ``{"model": DataParallel keys, "optimizer":
Adam state after one step, "epoch": 1}``; the command is ``ckpt migrate --strip-prefix module.
--arch resnet50 --arch-arg num_classes=10 --reinit-mismatched -o out.pth``. The baseline is the same
migration of the same checkpoint without its optimizer state. Targets: peak RSS under 150 MB and
wall time within 1.5x of the baseline. Each command runs 3 times as a whole process; the fastest
run is kept.
"""

from __future__ import annotations

import os
import subprocess
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import CKPT, OUT, PYTHON, measure, report  # noqa: E402
from bench_migrate import fresh  # noqa: E402 - the output removed before each timed run

MAKE = """
import sys, torch, torchvision
torch.manual_seed(0)
model = torchvision.models.resnet50(weights=None)
opt = torch.optim.Adam(model.parameters(), lr=1e-3)
for p in model.parameters():
    p.grad = torch.randn_like(p)
opt.step()
model_sd = {"module." + k: v for k, v in model.state_dict().items()}
torch.save({"model": model_sd, "optimizer": opt.state_dict(), "epoch": 1}, sys.argv[1] + ".tmp")
torch.save({"model": model_sd, "epoch": 1}, sys.argv[2] + ".tmp")
"""


def inputs() -> tuple[str, str]:
    with_optim = os.path.join(OUT, "resnet50_train_adam.pth")
    without = os.path.join(OUT, "resnet50_train_noopt.pth")
    if not (os.path.exists(with_optim) and os.path.exists(without)):
        os.makedirs(OUT, exist_ok=True)
        subprocess.run([PYTHON, "-c", MAKE, with_optim, without], check=True)
        os.replace(with_optim + ".tmp", with_optim)
        os.replace(without + ".tmp", without)
    return with_optim, without


def main() -> None:
    with_optim, without = inputs()
    out = os.path.join(OUT, "migrate_optim_out")
    os.makedirs(out, exist_ok=True)
    print(
        f"file: {with_optim} ({os.path.getsize(with_optim) / 1e6:.0f} MB); "
        f"without optimizer: {os.path.getsize(without) / 1e6:.0f} MB"
    )
    measure("warm-up", ["cat", with_optim, without], repeat=1)
    ops = ["--strip-prefix", "module.", "--arch", "resnet50", "--arch-arg", "num_classes=10", "--reinit-mismatched"]
    target = os.path.join(out, "noopt.pth")
    base = fresh("migrate, no optimizer state", CKPT + ["migrate", without, *ops, "-o", target], target)
    target = os.path.join(out, "optim.pth")
    ours = fresh("migrate, Adam state carried", CKPT + ["migrate", with_optim, *ops, "-o", target], target)
    # the same rename with the old head dropped instead of re-initialised: no values to make, so
    # torch is never imported (importing torch alone peaks far above 150 MB on a CUDA build)
    light = ["--strip-prefix", "module.", "--drop", "fc"]
    target = os.path.join(out, "noopt_light.pth")
    base_light = fresh(
        "migrate --drop fc, no optimizer state", CKPT + ["migrate", without, *light, "-o", target], target
    )
    target = os.path.join(out, "optim_light.pth")
    ours_light = fresh(
        "migrate --drop fc, Adam state carried", CKPT + ["migrate", with_optim, *light, "-o", target], target
    )
    torch_only = measure("python -c 'import torch'", [PYTHON, "-c", "import torch"], repeat=1)
    print("\nratios against the migration without optimizer state (new head: torch builds resnet50):")
    report([base, ours, torch_only], base)
    print("\nratios against the torch-free migration without optimizer state (head dropped):")
    report([base_light, ours_light], base_light)
    for label, run, ref in (("new head", ours, base), ("head dropped", ours_light, base_light)):
        ok_rss = run.peak_rss_mb < 150
        ok_wall = run.wall_s <= 1.5 * ref.wall_s
        print(
            f"targets ({label}): peak RSS < 150 MB: {'met' if ok_rss else 'NOT met'} ({run.peak_rss_mb:.0f} MB, "
            f"+{run.peak_rss_mb - ref.peak_rss_mb:.0f} MB for the optimizer state); wall within 1.5x: "
            f"{'met' if ok_wall else 'NOT met'} ({run.wall_s / ref.wall_s:.2f}x)"
        )


if __name__ == "__main__":
    main()
