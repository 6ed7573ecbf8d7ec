"""``ckpt browse`` on a 100,000-tensor checkpoint: time until the module tree is on the screen.

Run: ``python bench/bench_browse.py`` (needs tmux); ``python bench/bench_browse.py --screenshots docs/img``
writes the documentation's screenshots from real runs. The browser runs in a real 80x24 terminal (a
private tmux server); the clock starts when the command is typed and stops when the pane shows the
tree's root with its figures and first child. Target: under a second. Baselines in the same run:
``ckpt inspect --json`` of the same file and safetensors' own ``safe_open(...).keys()`` (whole
processes), so that the ratio says what the interface adds to reading the header.
"""

from __future__ import annotations

import os
import shutil
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import layouts  # noqa: E402
from _common import CKPT, HERE, OUT, PYTHON, measure  # noqa: E402
from terminal import Tmux  # noqa: E402

TENSORS = 100_000


def big_set() -> str:
    """The same 100,000 tensors as a 10-shard safetensors set, made once."""
    index = os.path.join(OUT, "scale", "sharded_st", "model.safetensors.index.json")
    if not os.path.exists(index):
        layouts.write_sharded(os.path.dirname(index), layouts.flat_specs(TENSORS), 10)
    return index


def big_safetensors() -> str:
    """5,000 layers x 10 modules x (weight, bias): 100,000 tiny tensors (``layouts.flat_specs``), made once."""
    path = os.path.join(OUT, "scale", "flat.safetensors")
    if not os.path.exists(path):
        os.makedirs(os.path.dirname(path), exist_ok=True)
        layouts.write_safetensors(path, layouts.flat_specs(TENSORS))
    return path


def time_to_tree(term: Tmux, path: str, marker: str, run: int) -> float:
    term.send(f"clear; echo READY-{run}", "Enter")
    term.wait_for(f"READY-{run}")
    start = time.perf_counter()
    term.send(" ".join([*CKPT, "browse", path]) + f"; echo DONE-{run}", "Enter")
    term.wait_for(f"model  {TENSORS} ·", marker, timeout=120.0)
    shown = time.perf_counter()
    term.send("q")
    term.wait_for(f"DONE-{run}")
    return shown - start


def screenshots(out: str) -> None:
    """The docs' screenshots: real runs of the app on torchvision checkpoints, exported as SVG at 80x24."""
    import asyncio
    import tempfile

    import torch
    import torchvision

    from ckpt_tool.browse.app import BrowseApp
    from ckpt_tool.browse.view import load

    out = os.path.abspath(out)
    work = tempfile.mkdtemp(prefix="ckpt-shots-")
    os.chdir(work)  # relative names on screen
    torch.manual_seed(0)
    model = torchvision.models.resnet18(weights=None)
    torch.save({"model": model.state_dict(), "epoch": 90, "best_acc1": 69.8}, "resnet18.pth")
    torch.save({"state_dict": {"module." + k: v for k, v in model.state_dict().items()}}, "resnet18_ddp.pth")
    payload = os.path.join(os.path.dirname(HERE), "fixtures", "malicious", "torch_zip_payload.pth")
    shutil.copy(payload, "downloaded.pth")

    async def shoot(name: str, data: object, keys: list[str]) -> None:
        app = BrowseApp(data)  # type: ignore[arg-type]
        async with app.run_test(size=(80, 24)) as pilot:
            await pilot.pause()
            await app.workers.wait_for_complete()
            for key in keys:
                await pilot.press(key)
                await app.workers.wait_for_complete()
                await pilot.pause()
            await pilot.pause()
            app.save_screenshot(f"{name}.svg", out)
        print(f"wrote {os.path.join(out, name + '.svg')}")

    diff = load("resnet18_ddp.pth", arch="resnet18", arch_args=["num_classes=10"])
    for name, data, keys in (
        ("browse", load("resnet18.pth"), ["down", "down", "down", "down", "down", "enter", "down", "tab", "v"]),
        ("browse-filter", load("resnet18.pth"), ["slash", *"downsample", "enter", "s", "s"]),
        ("browse-diff", diff, ["d", "tab"]),
        ("browse-plan", diff, ["p"]),
        ("browse-unsafe", load("downloaded.pth"), []),
        ("browse-summary", load("downloaded.pth"), ["i"]),
    ):
        asyncio.run(shoot(name, data, keys))


def main() -> None:
    if len(sys.argv) == 3 and sys.argv[1] == "--screenshots":
        screenshots(sys.argv[2])
        return
    if shutil.which("tmux") is None:
        raise SystemExit("tmux is needed (apt-get install tmux)")
    path, index = big_safetensors(), big_set()
    print(f"file: {path} ({TENSORS} tensors, {os.path.getsize(path) / 1e6:.1f} MB); set: {index} (10 shards)")
    term = Tmux()
    try:
        time_to_tree(term, path, "layers", 0)  # warm the page cache and the byte-code cache
        runs = [time_to_tree(term, path, "layers", i) for i in range(1, 6)]
        time_to_tree(term, index, "layers", 10)
        set_runs = [time_to_tree(term, index, "layers", i) for i in range(11, 16)]
    finally:
        term.close()
    inspect = measure("ckpt inspect --json", CKPT + ["inspect", path, "--json"])
    keys = measure(
        "safe_open().keys()",
        [PYTHON, "-c", f"from safetensors import safe_open; f = safe_open({path!r}, 'np'); len(f.keys())"],
    )
    best, median = min(runs), statistics.median(runs)
    print(f"{'command':<44} {'wall s':>8} {'ratio to tree':>14}")
    print(f"{'ckpt browse: tree on screen (best of 5)':<44} {best:>8.3f} {1.0:>14.3f}")
    print(f"{'ckpt browse: tree on screen (median of 5)':<44} {median:>8.3f} {median / best:>14.3f}")
    print(f"{'ckpt browse, 10-shard set (best of 5)':<44} {min(set_runs):>8.3f} {min(set_runs) / best:>14.3f}")
    print(
        f"{'ckpt browse, 10-shard set (median of 5)':<44} {statistics.median(set_runs):>8.3f} "
        f"{statistics.median(set_runs) / best:>14.3f}"
    )
    for r in (inspect, keys):
        print(f"{r.label:<44} {r.wall_s:>8.3f} {r.wall_s / best:>14.3f}")
    for what, times in (("file", runs), ("set", set_runs)):
        print(
            f"target: tree under 1 s, {what} -> best {min(times):.3f} s, median {statistics.median(times):.3f} s "
            f"({'met' if statistics.median(times) < 1.0 else 'NOT met'})"
        )


if __name__ == "__main__":
    main()
