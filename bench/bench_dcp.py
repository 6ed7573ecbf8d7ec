"""DCP conversion throughput: ``ckpt convert DIR out.safetensors`` against ``dcp.load`` + ``save_file``.

Run: ``python bench/bench_dcp.py``. The input is a torch.distributed.checkpoint directory of about
300 MB written by two gloo ranks (``dcp.save``): a third of the tensors split on dim 0, a third on
dim 1 (both gathered from two files), a third replicated (one chunk). The baseline reads it the
way torch does (``dcp.load`` into empty tensors of the global shapes, in one process) and writes
``safetensors.torch.save_file``. The other direction, ``ckpt convert x.safetensors DIR --format dcp``,
is measured against ``load_file`` + ``dcp.save``. Each command runs 3 times as a whole process
(outputs removed before each run, untimed); the fastest run is kept; ratios are against the baseline.
"""

from __future__ import annotations

import os
import subprocess
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import CKPT, OUT, PYTHON, fresh, measure, report  # noqa: E402

MAKE = """
import os, sys
import torch, torch.distributed as dist, torch.distributed.checkpoint as dcp, torch.multiprocessing as mp
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import Replicate, Shard, distribute_tensor

def rank(r, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT="29533")
    dist.init_process_group("gloo", rank=r, world_size=2)
    mesh = init_device_mesh("cpu", (2,))
    g = torch.Generator().manual_seed(0)
    sd = {}
    for i in range(18):
        t = torch.randn(2048, 2048, generator=g)  # 16 MB
        sd[f"layers.{i}.weight"] = distribute_tensor(t, mesh, [(Shard(0), Shard(1), Replicate())[i % 3]])
    dcp.save(sd, checkpoint_id=out)
    dist.destroy_process_group()

if __name__ == "__main__":
    mp.spawn(rank, args=(sys.argv[1],), nprocs=2)
"""

BASELINE = """
import sys, torch, torch.distributed.checkpoint as dcp
from safetensors.torch import save_file
meta = dcp.FileSystemReader(sys.argv[1]).read_metadata()
sd = {k: torch.empty(m.size, dtype=m.properties.dtype) for k, m in meta.state_dict_metadata.items()}
dcp.load(sd, checkpoint_id=sys.argv[1])
save_file(sd, sys.argv[2])
"""

BASELINE_BACK = """
import sys, torch.distributed.checkpoint as dcp
from safetensors.torch import load_file
dcp.save(load_file(sys.argv[1]), checkpoint_id=sys.argv[2])
"""


def dcp_dir() -> str:
    path = os.path.join(OUT, "dcp_300mb")
    if not os.path.isdir(path):
        os.makedirs(OUT, exist_ok=True)
        script = os.path.join(OUT, "make_dcp.py")
        with open(script, "w") as f:
            f.write(MAKE)
        subprocess.run([PYTHON, script, path + ".tmp"], check=True, capture_output=True)
        os.replace(path + ".tmp", path)
    return path


def main() -> None:
    src = dcp_dir()
    size = sum(os.path.getsize(os.path.join(src, n)) for n in os.listdir(src))
    print(f"input: {src} ({size / 1e6:.0f} MB, {len(os.listdir(src)) - 1} .distcp files)")
    out = os.path.join(OUT, "dcp_out")
    os.makedirs(out, exist_ok=True)
    for name in os.listdir(src):
        measure("warm-up", ["cat", os.path.join(src, name)], repeat=1)
    theirs_st = os.path.join(out, "theirs.safetensors")
    baseline = fresh("dcp.load + save_file", [PYTHON, "-c", BASELINE, src, theirs_st], theirs_st)
    ours_st = os.path.join(out, "ours.safetensors")
    ours = fresh("ckpt convert DIR out.safetensors", CKPT + ["convert", src, ours_st], ours_st)
    report([baseline, ours], baseline)
    print(
        f"throughput: ckpt {size / 1e6 / ours.wall_s:.0f} MB/s, dcp.load + save_file "
        f"{size / 1e6 / baseline.wall_s:.0f} MB/s"
    )
    print()
    theirs_dir = os.path.join(out, "theirs_dcp")
    back = fresh("load_file + dcp.save", [PYTHON, "-c", BASELINE_BACK, theirs_st, theirs_dir], theirs_dir)
    ours_dir = os.path.join(out, "ours_dcp")
    ours_back = fresh(
        "ckpt convert x.safetensors DIR --format dcp",
        CKPT + ["convert", theirs_st, ours_dir, "--format", "dcp"],
        ours_dir,
    )
    report([back, ours_back], back)


if __name__ == "__main__":
    main()
