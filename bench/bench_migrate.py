"""``ckpt migrate vgg16.pth --drop classifier.6 -o out.safetensors`` against the naive way and ``cp``.

Run: ``python bench/bench_migrate.py [--compare TREE]`` (``--big`` adds the sharded set below;
``--compare TREE`` also runs each ckpt command from another checkout of the package, ``git archive
REV | tar -x -C TREE``, alternating with this one: a before and after in one run). The naive way:
``torch.load``, delete the keys from the dict, ``safetensors.torch.save_file``. Targets: peak RSS
under 100 MB and wall time within 1.5x of ``cp`` followed by ``sync`` of the same bytes (a durable
copy: ckpt fsyncs before it renames). Also measured: the same migration to ``.pth`` and a
``--dtype float16`` cast. Each command runs 3 times as a whole process; the fastest run is kept.

``--big``: a 3.1 GB Llama-layout sharded set (bench/layouts.py; sparse source, real output bytes)
migrated to 1 GB shards and converted to one file; target: peak RSS under 200 MB, whatever the size.
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import CKPT, OUT, PYTHON, Run, bench_env, fresh, measure, report, run_process, vgg16_pth  # noqa: E402

NAIVE = """
import sys, torch
from safetensors.torch import save_file
sd = torch.load(sys.argv[1], weights_only=True, map_location="cpu")
for k in [k for k in sd if k == "classifier.6" or k.startswith("classifier.6.")]:
    del sd[k]
save_file(sd, sys.argv[2])
"""


def _compared(label: str, cmd: list[str], output: str, tree: str, baseline: list[str], repeat: int = 5) -> list[Run]:
    """``baseline`` (its last word: the file it writes), ``cmd`` from ``tree`` and ``cmd`` from this
    checkout, one after the other ``repeat`` times (a loaded machine slows all three alike), best of
    each; the outputs removed (untimed) before every run."""
    other = bench_env(PYTHONPATH=os.path.abspath(tree))
    then = [PYTHON, "-P", *cmd[1:]]  # -P: the tree on PYTHONPATH is imported, not the current directory
    runs: dict[str, Run] = {}
    for _ in range(repeat):
        for name, c, env in (
            ("cp + sync", baseline[:-1], None),
            (f"{label} (before)", then, other),
            (label, cmd, None),
        ):
            for path in (output, baseline[-1]):
                if os.path.exists(path):
                    os.unlink(path)
            _, wall, rss, _ = run_process(c, env)
            if name not in runs or wall < runs[name].wall_s:
                runs[name] = Run(name, wall, rss, 0)
    return list(runs.values())


def main() -> None:
    src = vgg16_pth()
    out = os.path.join(OUT, "migrate_out")
    os.makedirs(out, exist_ok=True)
    print(f"file: {src} ({os.path.getsize(src) / 1e6:.0f} MB)")
    print(f"load average: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    # page cache warm for everyone: read the file once first
    measure("warm-up", ["cat", src], repeat=1)
    copy = os.path.join(out, "copy.pth")
    cp = fresh("cp vgg16.pth", ["cp", src, copy], copy)
    # ckpt fsyncs what it writes (durability before the rename); cp does not unless asked
    cp_sync = fresh("cp vgg16.pth + sync (fsync) of the copy", ["sh", "-c", f"cp {src} {copy} && sync {copy}"], copy)
    target = os.path.join(out, "ours.safetensors")
    cmd = CKPT + ["migrate", src, "--drop", "classifier.6", "-o", target]
    if "--compare" in sys.argv:
        tree = sys.argv[sys.argv.index("--compare") + 1]
        baseline = ["sh", "-c", f"cp {src} {copy} && sync {copy}", copy]
        runs = _compared("ckpt migrate --drop classifier.6 -> .safetensors", cmd, target, tree, baseline)
        print(f"load average: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
        report(runs, runs[0])
        return
    ours = fresh("ckpt migrate --drop classifier.6 -> .safetensors", cmd, target)
    target = os.path.join(out, "ours.pth")
    ours_pth = fresh(
        "ckpt migrate --drop classifier.6 -> .pth",
        CKPT + ["migrate", src, "--drop", "classifier.6", "-o", target],
        target,
    )
    target = os.path.join(out, "half.safetensors")
    cast = fresh(
        "ckpt migrate --dtype float16 -> .safetensors",
        CKPT + ["migrate", src, "--dtype", "float16", "-o", target],
        target,
    )
    target = os.path.join(out, "naive.safetensors")
    naive = fresh("naive: torch.load + del + save_file", [PYTHON, "-c", NAIVE, src, target], target)
    print("\nratios against cp:")
    report([cp, cp_sync, ours, ours_pth, cast, naive], cp)
    print("\nratios against cp + sync:")
    report([cp_sync, ours], cp_sync)
    print("\nratios against the naive way:")
    report([naive, ours], naive)
    ok_rss = ours.peak_rss_mb < 100
    ok_wall = ours.wall_s <= 1.5 * cp_sync.wall_s
    print(
        f"\ntargets: peak RSS < 100 MB: {'met' if ok_rss else 'NOT met'} ({ours.peak_rss_mb:.0f} MB); "
        f"wall within 1.5x of cp + sync: {'met' if ok_wall else 'NOT met'} ({ours.wall_s / cp_sync.wall_s:.2f}x; "
        f"{ours.wall_s / cp.wall_s:.2f}x of a plain cp)"
    )


def big() -> None:
    """A multi-GB sharded set: bounded memory whatever the size, against cp + sync of the same bytes."""
    import shutil

    from layouts import llama_sharded

    src = os.path.join(OUT, "llama_3g")
    if not os.path.exists(os.path.join(src, "config.json")):
        llama_sharded(src, layers=32, hidden=2048, intermediate=5632, heads=16, kv_heads=4, vocab=32000, shards=8)
    nbytes = sum(os.path.getsize(os.path.join(src, n)) for n in os.listdir(src))
    print(f"\nset: {src} ({nbytes / 1e9:.1f} GB in 8 shards)")
    out = os.path.join(OUT, "big_out")
    runs = []
    for label, cmd in [
        (
            "cp --sparse=never + sync",
            ["sh", "-c", f"mkdir -p {out} && cp --sparse=never {src}/* {out}/ && sync {out}/*"],
        ),
        (
            "ckpt migrate --drop lm_head, 1GB shards",
            CKPT
            + [
                "migrate",
                src,
                "--drop",
                "lm_head",
                "-o",
                os.path.join(out, "model.safetensors"),
                "--max-shard-size",
                "1GB",
            ],
        ),
        ("ckpt convert -> one .safetensors", CKPT + ["convert", src, os.path.join(out, "one.safetensors")]),
    ]:
        shutil.rmtree(out, ignore_errors=True)
        os.makedirs(out)
        runs.append(measure(label, cmd, repeat=1))
    shutil.rmtree(out, ignore_errors=True)
    report(runs, runs[0])
    peak = max(r.peak_rss_mb for r in runs[1:])
    print(
        f"\ntarget: peak RSS under 200 MB on {nbytes / 1e9:.1f} GB: {'met' if peak < 200 else 'NOT met'} "
        f"({peak:.0f} MB)"
    )


if __name__ == "__main__":
    main()
    if "--big" in sys.argv:
        big()
