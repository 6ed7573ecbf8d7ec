"""``ckpt diff LLAMA70B_DIR --arch hf:LLAMA70B_DIR`` against the naive way, on a 70B-layout set of sparse files.

Run: ``python bench/bench_hf.py``. The set (29 safetensors shards, 138 GB declared, a few hundred KB
on disk) and its Llama-2-70B config.json are made once in bench/out/ by bench/layouts.py. Cold runs
get an empty signature cache (transformers builds the model on the meta device); the warm run
reads the cached signature (no torch import). The naive way: import transformers, build the model
on the meta device from the config, read every shard's header with ``safe_open`` and compare keys
and shapes. Target: the cold diff under 10 s and 1 GB peak RSS.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import CKPT, OUT, PYTHON, bench_env, measure, report  # noqa: E402
from layouts import LLAMA2_70B, llama_sharded  # noqa: E402

NAIVE = """
import json, os, sys, torch, transformers
from safetensors import safe_open
d = sys.argv[1]
config = transformers.AutoConfig.from_pretrained(d, local_files_only=True)
with torch.device("meta"):
    model = transformers.AutoModelForCausalLM.from_config(config)
want = {k: tuple(v.shape) for k, v in model.state_dict().items()}
have = {}
for name in sorted(set(json.load(open(os.path.join(d, "model.safetensors.index.json")))["weight_map"].values())):
    with safe_open(os.path.join(d, name), framework="pt") as f:
        for k in f.keys():
            have[k] = tuple(f.get_slice(k).get_shape())
print(sorted(set(want) ^ set(have)), [k for k in want if k in have and want[k] != have[k]])
"""


def main() -> None:
    directory = os.path.join(OUT, "llama2_70b")
    if not os.path.exists(os.path.join(directory, "config.json")):
        llama_sharded(directory, **LLAMA2_70B)
    declared = sum(os.path.getsize(os.path.join(directory, n)) for n in os.listdir(directory))
    print(f"set: {directory} ({declared / 1e9:.0f} GB declared, 29 shards, sparse)")
    cache = tempfile.mkdtemp(prefix="ckpt-bench-cache-")
    try:
        cmd = CKPT + ["diff", directory, "--arch", f"hf:{directory}"]
        # an unwritable cache directory would change the status line only: give each cold run a fresh one
        cold = None
        for i in range(3):
            env = bench_env(CKPT_CACHE_DIR=os.path.join(cache, f"cold{i}"))
            run = measure("ckpt diff --arch hf: (cold cache)", cmd, repeat=1, env=env)
            cold = run if cold is None or run.wall_s < cold.wall_s else cold
        assert cold is not None
        warm = measure(
            "ckpt diff --arch hf: (warm cache)", cmd, env=bench_env(CKPT_CACHE_DIR=os.path.join(cache, "cold0"))
        )
        naive = measure("naive: transformers meta build + safe_open", [PYTHON, "-c", NAIVE, directory], env=bench_env())
    finally:
        shutil.rmtree(cache, ignore_errors=True)
    report([naive, cold, warm], naive)
    ok = cold.wall_s < 10 and cold.peak_rss_mb < 1024
    print(
        f"\ntarget: cold diff under 10 s and 1 GB: {'met' if ok else 'NOT met'} "
        f"({cold.wall_s:.2f} s, {cold.peak_rss_mb:.0f} MB)"
    )


if __name__ == "__main__":
    main()
