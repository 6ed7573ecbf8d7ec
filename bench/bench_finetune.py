"""``ckpt finetune-check`` against the plain hand-written PyTorch loop, on the CPU.

Both train resnet18 (loaded from the same state dict, head replaced by a 10-class one) at 64 px,
batch 32, SGD lr 0.01 momentum 0.9, 30 steps on synthetic batches, every parameter trainable.
Each is a whole process; the runs alternate (``--repeat``, default 3) and the median images/s of
each is compared. Target: finetune-check >= 0.95x the plain loop's images/s.

Run: ``python bench/bench_finetune.py [--repeat N]``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import CKPT, OUT, PYTHON  # noqa: E402

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
start = time.perf_counter()
running = 0.0
for i in range({STEPS}):
    running += step(i)
elapsed = time.perf_counter() - start
print(json.dumps({{"images_per_s": {STEPS * BATCH} / elapsed, "mean_loss": running / {STEPS}}}))
"""


def resnet18_pth() -> str:
    path = os.path.join(OUT, "resnet18.pth")
    if not os.path.exists(path):
        os.makedirs(OUT, exist_ok=True)
        code = ("import torch, torchvision; torch.manual_seed(0); "
                f"torch.save(torchvision.models.resnet18(weights=None).state_dict(), {path + '.tmp'!r})")
        subprocess.run([PYTHON, "-c", code], check=True)
        os.replace(path + ".tmp", path)
    return path


def run(cmd: list[str]) -> tuple[dict, float, float]:
    """One whole process: its JSON on stdout, wall seconds, peak RSS in MB (wait4's rusage of that child)."""
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    out = proc.stdout.read() if proc.stdout else b""
    err = proc.stderr.read() if proc.stderr else b""
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - start
    code = os.waitstatus_to_exitcode(status)
    if code not in (0, 1):
        raise SystemExit(f"{cmd[:4]}...: exit {code}\n{err.decode(errors='replace')}")
    return json.loads(out), wall, usage.ru_maxrss / 1024


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    ckpt = resnet18_pth()
    tool_cmd = CKPT + ["finetune-check", ckpt, "--arch", "resnet18", "--num-classes", "10", "--image-size", str(SIZE),
                       "--batch-size", str(BATCH), "--max-steps", str(STEPS), "--data", f"synthetic:{STEPS * BATCH}",
                       "--optimizer", "sgd", "--lr", str(LR), "--device", "cpu", "--json", "--quiet"]
    plain_cmd = [PYTHON, "-c", PLAIN_LOOP, ckpt]
    tool, plain = [], []
    for _ in range(args.repeat):
        report, wall, rss = run(tool_cmd)
        tool.append((report["images_per_s"], wall, rss, report))
        result, wall, rss = run(plain_cmd)
        plain.append((result["images_per_s"], wall, rss))
    t_ips = statistics.median(r[0] for r in tool)
    p_ips = statistics.median(r[0] for r in plain)
    print(f"resnet18, {SIZE}px, batch {BATCH}, SGD, {STEPS} steps, torch threads: default; "
          f"{args.repeat} alternating runs each, medians")
    print(f"{'command':<36} {'images/s':>9} {'wall s':>8} {'peak RSS MB':>12}")
    print(f"{'plain PyTorch loop':<36} {p_ips:>9.1f} {statistics.median(r[1] for r in plain):>8.2f} "
          f"{statistics.median(r[2] for r in plain):>12.0f}")
    print(f"{'ckpt finetune-check':<36} {t_ips:>9.1f} {statistics.median(r[1] for r in tool):>8.2f} "
          f"{statistics.median(r[2] for r in tool):>12.0f}")
    checks = {c["name"]: c["status"] for c in tool[-1][3]["checks"]}
    print(f"images/s ratio finetune-check / plain loop: {t_ips / p_ips:.3f} (target >= 0.95)")
    print(f"all runs images/s: tool {[round(r[0], 1) for r in tool]}, plain {[round(r[0], 1) for r in plain]}")
    print("finetune-check's wall time also covers its checks (overfit-one-batch, held-out accuracy before and "
          f"after, parameter snapshots); its checks: {checks}")


if __name__ == "__main__":
    main()
