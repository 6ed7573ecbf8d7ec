"""Benchmark ``ckpt diff vgg16.pth --arch vgg16`` against the naive way, as whole processes.

The naive way: import torch and torchvision, build vgg16 on CPU, ``torch.load`` the checkpoint and
``load_state_dict(strict=False)``. ckpt runs cold with its shipped torchvision table (an empty
signature cache: no torch import at all), built (``--arch-arg dropout=0.5``, an argument the table
does not state, with ``--no-cache``: torch builds the target on the meta device) and warm (that
built signature read from the on-disk cache: no torch).

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
    print(
        f"checkpoint: {ckpt_path} ({os.path.getsize(ckpt_path) / 2**20:.0f} MB); {os.cpu_count()} CPUs; "
        f"load average {os.getloadavg()[0]:.2f}"
    )
    env = bench_env(CKPT_CACHE_DIR=CACHE)
    cold_env = bench_env(CKPT_CACHE_DIR=os.path.join(OUT, "empty-cache"))
    shutil.rmtree(cold_env["CKPT_CACHE_DIR"], ignore_errors=True)
    ckpt = ckpt_executable() + ["diff", ckpt_path, "--arch", "vgg16"]
    built = ckpt + ["--arch-arg", "dropout=0.5"]  # vgg16's default, but not a question the table answers
    naive, table, meta, warm = (
        "naive (torch.load + load_state_dict)",
        "ckpt diff, cold, shipped table",
        "ckpt diff, built on meta (--no-cache)",
        "ckpt diff, warm cache",
    )
    cases = {
        naive: ([sys.executable, "-c", NAIVE, ckpt_path], env),
        table: (ckpt, cold_env),
        meta: (built + ["--no-cache"], env),
        warm: (built, env),
    }
    measure(built, env)  # fills the cache (and the page cache) before anything is timed
    results: dict[str, tuple[float, float]] = {}
    for name, (argv, case_env) in cases.items():
        runs = [measure(argv, case_env) for _ in range(args.repeat)]
        results[name] = (statistics.median(r[0] for r in runs), max(r[1] for r in runs))
    if os.path.exists(os.path.join(cold_env["CKPT_CACHE_DIR"], "signatures")):
        raise SystemExit("the shipped-table run wrote a cache entry: it built the model")
    naive_wall, naive_rss = results[naive]
    print(f"\n{'command':40} {'wall s':>8} {'peak RSS MB':>12} {'wall ratio':>11} {'RSS ratio':>10}")
    for name, (wall, rss) in results.items():
        print(f"{name:40} {wall:8.3f} {rss:12.1f} {wall / naive_wall:10.3f}x {rss / naive_rss:9.3f}x")
    table_wall, table_rss = results[table]
    meta_wall, meta_rss = results[meta]
    warm_wall, warm_rss = results[warm]
    print("\ntargets:")
    print(
        f"  table: >= 15x faster than naive: {naive_wall / table_wall:.1f}x  "
        f"{'ok' if naive_wall >= 15 * table_wall else 'MISSED'}"
    )
    print(f"  table: wall < 0.3 s:             {table_wall:.3f} s  {'ok' if table_wall < 0.3 else 'MISSED'}")
    print(f"  table: peak RSS < 40 MB:         {table_rss:.1f} MB  {'ok' if table_rss < 40 else 'MISSED'}")
    print(
        f"  built: wall <= 0.65x naive:      {meta_wall / naive_wall:.2f}x  "
        f"{'ok' if meta_wall <= 0.65 * naive_wall else 'MISSED'}"
    )
    print(
        f"  built: RSS  <= 0.5x naive:       {meta_rss / naive_rss:.2f}x  {'ok' if meta_rss <= 0.5 * naive_rss else 'MISSED'}"
    )
    print(f"  warm:  wall < 0.3 s:             {warm_wall:.3f} s  {'ok' if warm_wall < 0.3 else 'MISSED'}")
    print(f"  warm:  RSS  < 60 MB:             {warm_rss:.1f} MB  {'ok' if warm_rss < 60 else 'MISSED'}")


if __name__ == "__main__":
    main()
