"""``ckpt migrate vgg16.pth --drop classifier.6 -o out.safetensors`` against the naive way and ``cp``.

Run: ``python bench/bench_migrate.py``. The naive way: ``torch.load``, delete the keys from the dict,
``safetensors.torch.save_file``. Targets: peak RSS under 100 MB and wall time within 2x of ``cp``
of the same file. Also measured: the same migration to ``.pth`` and a ``--dtype float16`` cast.
Each command runs 3 times as a whole process; the fastest run is kept.
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import CKPT, OUT, PYTHON, fresh, measure, report, vgg16_pth  # noqa: E402

NAIVE = """
import sys, torch
from safetensors.torch import save_file
sd = torch.load(sys.argv[1], weights_only=True, map_location="cpu")
for k in [k for k in sd if k == "classifier.6" or k.startswith("classifier.6.")]:
    del sd[k]
save_file(sd, sys.argv[2])
"""


def main() -> None:
    src = vgg16_pth()
    out = os.path.join(OUT, "migrate_out")
    os.makedirs(out, exist_ok=True)
    print(f"file: {src} ({os.path.getsize(src) / 1e6:.0f} MB)")
    # page cache warm for everyone: read the file once first
    measure("warm-up", ["cat", src], repeat=1)
    copy = os.path.join(out, "copy.pth")
    cp = fresh("cp vgg16.pth", ["cp", src, copy], copy)
    # ckpt fsyncs what it writes (durability before the rename); cp does not unless asked
    cp_sync = fresh("cp vgg16.pth + sync (fsync) of the copy", ["sh", "-c", f"cp {src} {copy} && sync {copy}"], copy)
    target = os.path.join(out, "ours.safetensors")
    ours = fresh("ckpt migrate --drop classifier.6 -> .safetensors", CKPT + [
        "migrate", src, "--drop", "classifier.6", "-o", target], target)
    target = os.path.join(out, "ours.pth")
    ours_pth = fresh("ckpt migrate --drop classifier.6 -> .pth", CKPT + [
        "migrate", src, "--drop", "classifier.6", "-o", target], target)
    target = os.path.join(out, "half.safetensors")
    cast = fresh("ckpt migrate --dtype float16 -> .safetensors", CKPT + [
        "migrate", src, "--dtype", "float16", "-o", target], target)
    target = os.path.join(out, "naive.safetensors")
    naive = fresh("naive: torch.load + del + save_file", [PYTHON, "-c", NAIVE, src, target], target)
    print("\nratios against cp:")
    report([cp, cp_sync, ours, ours_pth, cast, naive], cp)
    print("\nratios against cp + sync:")
    report([cp_sync, ours], cp_sync)
    print("\nratios against the naive way:")
    report([naive, ours], naive)
    ok_rss = ours.peak_rss_mb < 100
    ok_wall = ours.wall_s <= 2 * cp.wall_s
    print(f"\ntargets: peak RSS < 100 MB: {'met' if ok_rss else 'NOT met'} ({ours.peak_rss_mb:.0f} MB); "
          f"wall within 2x of cp: {'met' if ok_wall else 'NOT met'} ({ours.wall_s / cp.wall_s:.2f}x; "
          f"{ours.wall_s / cp_sync.wall_s:.2f}x of cp + sync)")


if __name__ == "__main__":
    main()
