"""``ckpt finetune-check`` against the plain hand-written PyTorch loop, on the CPU.

Both train resnet18 (loaded from the same state dict, head replaced by a 10-class one) at 64 px,
batch 32, SGD lr 0.01 momentum 0.9, 30 steps on synthetic batches, every parameter trainable.
Each is a whole process with the same torch thread count (``--threads``, default 1); the runs
alternate (``--repeat``, default 5) and the median images/s of
each is compared, over the whole loop and by median step time (robust to a busy machine). Target: finetune-check >= 0.95x the plain loop's images/s.

With ``--ddp``: finetune-check on 1 process vs 2 (torch.distributed, gloo, ``--nproc 2``) on the
CPU, the same images in all (each rank trains its half), resnet18 at 64 px, batch 16 per process;
images/s as the report counts it (all ranks' images over the slowest rank's training time). The
one-process run is timed with 1 and with 2 torch threads, so the 2-process run is compared with
the same cores used either way. CUDA: on a machine with GPUs, ``--ddp --device cuda`` runs the same
with nccl (one GPU per process); it is not run here (no GPU).

With ``--default``: the README's default invocation (``ckpt finetune-check resnet18.pth --arch resnet18
--num-classes 10``), whole-process wall time, against the same at ``--image-size 224``.

Run: ``python bench/bench_finetune.py [--repeat N]``, ``python bench/bench_finetune.py --ddp [--repeat N]``
or ``python bench/bench_finetune.py --default [--repeat N]``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import CKPT, PYTHON, bench_env, run_process, torchvision_pth  # noqa: E402

STEPS, BATCH, SIZE, LR = 30, 32, 64, 0.01

# the loop in the user's notes: build, load, swap the head, train; warm-up steps are not timed
PLAIN_LOOP = f"""
import json, sys, time
import torch, torchvision
from torch import nn

torch.manual_seed(0)
model = torchvision.models.resnet18(weights=None)
model.load_state_dict(torch.load(sys.argv[1], weights_only=True))
model.fc = nn.Linear(512, 10)
optimizer = torch.optim.SGD(model.parameters(), lr={LR}, momentum=0.9)
criterion = nn.CrossEntropyLoss()
model.train()


def batch(i):
    gen = torch.Generator().manual_seed(i)
    return torch.randn({BATCH}, 3, {SIZE}, {SIZE}, generator=gen), torch.randint(0, 10, ({BATCH},), generator=gen)


def step(i):
    x, y = batch(i)
    optimizer.zero_grad()
    loss = criterion(model(x), y)
    loss.backward()
    optimizer.step()
    return loss.item()


for i in range(2):
    step(1000 + i)
start = tick = time.perf_counter()
running, times = 0.0, []
for i in range({STEPS}):
    running += step(i)
    now = time.perf_counter()
    times.append(now - tick)
    tick = now
elapsed = time.perf_counter() - start
times.sort()
print(json.dumps({{"images_per_s": {STEPS * BATCH} / elapsed, "median_step_s": times[len(times) // 2],
                  "mean_loss": running / {STEPS}}}))
"""


# the plain loop's training, as finetune-check options
SGD_AT_SIZE = ("--image-size", str(SIZE), "--optimizer", "sgd", "--lr", str(LR))


def finetune_cmd(ckpt: str, *options: str) -> list[str]:
    """``ckpt finetune-check`` of a resnet18 checkpoint with a 10-class head, the report as JSON on stdout."""
    return CKPT + ["finetune-check", ckpt, "--arch", "resnet18", "--num-classes", "10", *options, "--json", "--quiet"]


def run(cmd: list[str], env: dict[str, str]) -> tuple[dict, float, float]:
    """One whole process: its JSON on stdout, wall seconds, peak RSS in MB."""
    _, wall, rss, out = run_process(cmd, env, capture=True)
    return json.loads(out), wall, rss


DDP_IMAGES, DDP_BATCH = 256, 16


def ddp(repeat: int, device: str) -> None:
    """1 process vs 2 processes (``--nproc 2``): images/s over the same images."""
    ckpt = torchvision_pth("resnet18")
    base = finetune_cmd(
        ckpt,
        *SGD_AT_SIZE,
        "--batch-size",
        str(DDP_BATCH),
        "--data",
        f"synthetic:{DDP_IMAGES}",
        "--device",
        device,
        "--overfit-steps",
        "1",
        "--eval-batches",
        "1",
    )
    runs: dict[str, list[tuple[float, float, float]]] = {}
    setups = [
        ("1 process, 1 thread", [], "1"),
        ("1 process, 2 threads", [], "2"),
        ("2 processes x 1 thread (gloo)", ["--nproc", "2"], "1"),
    ]
    for _ in range(repeat):
        for label, extra, threads in setups:
            report, wall, rss = run(base + extra, bench_env(OMP_NUM_THREADS=threads))
            runs.setdefault(label, []).append((report["images_per_s"], wall, rss))
    print(
        f"resnet18, {SIZE}px, batch {DDP_BATCH} per process, SGD, {DDP_IMAGES} images per epoch, {device}; "
        f"{repeat} alternating runs each, medians"
    )
    print(f"{'setup':<32} {'images/s':>9} {'wall s':>8} {'peak RSS MB (launcher)':>23}")
    one = statistics.median(r[0] for r in runs[setups[0][0]])
    for label, _, _ in setups:
        ips = statistics.median(r[0] for r in runs[label])
        print(
            f"{label:<32} {ips:>9.1f} {statistics.median(r[1] for r in runs[label]):>8.2f} "
            f"{statistics.median(r[2] for r in runs[label]):>23.0f}   x{ips / one:.2f}"
        )
    print(f"all runs images/s: { {k: [round(r[0], 1) for r in v] for k, v in runs.items()} }")


def default_cost(repeat: int) -> None:
    """What the README's default invocation costs: whole-process wall time, medians of alternating runs.

    ``ckpt finetune-check resnet18.pth --arch resnet18 --num-classes 10`` as a user types it (all CPU
    threads, synthetic data: trained at 112 px on the CPU, forward pass at 224 px), against the same
    run at 224 px (``--image-size 224``, what the default trained at before), with the load average
    before and after each run (the machine is shared: the figures are only as steady as it is).
    """
    ckpt = torchvision_pth("resnet18")
    base = finetune_cmd(ckpt)
    setups = [("default (112 px training, 224 px forward)", []), ("--image-size 224", ["--image-size", "224"])]
    runs: dict[str, list[tuple[float, float, float, bool]]] = {}
    loads = [os.getloadavg()[0]]
    for _ in range(repeat):
        for label, extra in setups:
            report, wall, rss = run(base + extra, bench_env())
            runs.setdefault(label, []).append((wall, rss, report["images_per_s"], report["passed"]))
            loads.append(os.getloadavg()[0])
    print(
        f"resnet18 --num-classes 10, defaults otherwise (synthetic data, 8 batches of 16, Adam 1e-3, "
        f"20 overfit steps), CPU, {os.cpu_count()} cores; {repeat} alternating runs each, medians"
    )
    print(f"{'setup':<44} {'wall s':>8} {'images/s':>9} {'peak RSS MB':>12} {'passed':>7}")
    for label, _ in setups:
        r = runs[label]
        print(
            f"{label:<44} {statistics.median(x[0] for x in r):>8.1f} {statistics.median(x[2] for x in r):>9.1f} "
            f"{statistics.median(x[1] for x in r):>12.0f} {all(x[3] for x in r)!s:>7}"
        )
    print(f"all runs wall s: { {k: [round(x[0], 1) for x in v] for k, v in runs.items()} }")
    print(
        f"1-minute load average around the runs: median {statistics.median(loads):.1f}, "
        f"min {min(loads):.1f}, max {max(loads):.1f}"
    )


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch CPU threads for both (1 keeps the comparison steady on a shared machine)",
    )
    parser.add_argument("--ddp", action="store_true", help="1 vs 2 processes (torch.distributed) instead")
    parser.add_argument("--device", default="cpu", help="with --ddp: cpu (gloo) or cuda (nccl)")
    parser.add_argument("--default", action="store_true", help="the default invocation's cost instead")
    args = parser.parse_args()
    if args.default:
        default_cost(args.repeat)
        return
    if args.ddp:
        ddp(args.repeat, args.device)
        return
    env = bench_env(OMP_NUM_THREADS=str(args.threads))
    ckpt = torchvision_pth("resnet18")
    tool_cmd = finetune_cmd(
        ckpt,
        *SGD_AT_SIZE,
        "--batch-size",
        str(BATCH),
        "--max-steps",
        str(STEPS),
        "--data",
        f"synthetic:{STEPS * BATCH}",
        "--device",
        "cpu",
    )
    plain_cmd = [PYTHON, "-c", PLAIN_LOOP, ckpt]
    tool, plain = [], []
    for _ in range(args.repeat):
        report, wall, rss = run(tool_cmd, env)
        tool.append((report["images_per_s"], wall, rss, report, BATCH / report["phases"][0]["median_step_s"]))
        result, wall, rss = run(plain_cmd, env)
        plain.append((result["images_per_s"], wall, rss, result, BATCH / result["median_step_s"]))
    t_ips = statistics.median(r[0] for r in tool)
    p_ips = statistics.median(r[0] for r in plain)
    t_step = statistics.median(r[4] for r in tool)
    p_step = statistics.median(r[4] for r in plain)
    print(
        f"resnet18, {SIZE}px, batch {BATCH}, SGD, {STEPS} steps, {args.threads} torch thread(s); "
        f"{args.repeat} alternating runs each, medians"
    )
    print(f"{'command':<24} {'images/s':>9} {'images/s (median step)':>23} {'wall s':>8} {'peak RSS MB':>12}")
    for label, ips, step_ips, runs in (
        ("plain PyTorch loop", p_ips, p_step, plain),
        ("ckpt finetune-check", t_ips, t_step, tool),
    ):
        print(
            f"{label:<24} {ips:>9.1f} {step_ips:>23.1f} {statistics.median(r[1] for r in runs):>8.2f} "
            f"{statistics.median(r[2] for r in runs):>12.0f}"
        )
    checks = {c["name"]: c["status"] for c in tool[-1][3]["checks"]}
    print(
        f"images/s ratio finetune-check / plain loop: {t_ips / p_ips:.3f} over the whole loop, "
        f"{t_step / p_step:.3f} by median step (target >= 0.95)"
    )
    print(f"all runs images/s: tool {[round(r[0], 1) for r in tool]}, plain {[round(r[0], 1) for r in plain]}")
    print(
        f"all runs median-step images/s: tool {[round(r[4], 1) for r in tool]}, plain {[round(r[4], 1) for r in plain]}"
    )
    print(
        "finetune-check's wall time also covers its checks (overfit-one-batch, held-out accuracy before and "
        f"after, parameter snapshots); its checks: {checks}"
    )


if __name__ == "__main__":
    main()
