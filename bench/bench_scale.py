"""Per-tensor cost: ckpt on 100,000-tensor files and sets, a 70B Llama-layout set, a DeepSeek-V3-style set.

Run: ``python bench/bench_scale.py [--repeat N] [--quick | --pth] [--compare TREE]``. Inputs are made once in ``bench/out/scale/`` by
``bench/layouts.py`` (safetensors data sections are sparse holes; ``.pth`` files are real
``torch.save`` outputs of tiny tensors). Every command is a whole process, best of N, in the same
run as its baselines: ``safe_open(...).keys()`` on the same safetensors file and
``torch.load(weights_only=True)`` of the same ``.pth``.

``--compare TREE`` also runs every ckpt command from another checkout of the package (``git archive
main | tar -x -C TREE``), alternating with this one, and prints both with their ratio: a before and
after in one run on a shared machine.

Targets (issue 14): inspect, scan, validate and ``diff A B`` of each 100,000-tensor input under 1 s
and 200 MB peak RSS; ``inspect`` within 2x of ``safe_open(...).keys()``.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import layouts  # noqa: E402
from _common import CKPT, OUT, PYTHON, Run, bench_env, measure  # noqa: E402

SCALE = os.path.join(OUT, "scale")


def inputs() -> dict[str, str]:
    """Every input, made once (about 80 MB of real bytes; the big sets are sparse)."""
    os.makedirs(SCALE, exist_ok=True)
    specs = layouts.flat_specs(100_000)
    made = {
        "flat.safetensors": os.path.join(SCALE, "flat.safetensors"),
        "flat.pth": os.path.join(SCALE, "flat.pth"),
        "sharded_st": os.path.join(SCALE, "sharded_st", "model.safetensors.index.json"),
        "sharded_pth": os.path.join(SCALE, "sharded_pth", "pytorch_model.bin.index.json"),
        "llama70b": os.path.join(SCALE, "llama70b", "model.safetensors.index.json"),
        "deepseek": os.path.join(SCALE, "deepseek", "model.safetensors.index.json"),
    }
    if not os.path.exists(made["flat.safetensors"]):
        layouts.write_safetensors(made["flat.safetensors"], specs)
    if not os.path.exists(made["flat.pth"]):
        layouts.write_pth(made["flat.pth"], specs)
    if not os.path.exists(made["sharded_st"]):
        layouts.write_sharded(os.path.dirname(made["sharded_st"]), specs, 10)
    if not os.path.exists(made["sharded_pth"]):
        layouts.write_sharded(os.path.dirname(made["sharded_pth"]), specs, 10, fmt="pth")
    if not os.path.exists(made["llama70b"]):
        layouts.write_sharded(os.path.dirname(made["llama70b"]), layouts.llama_specs(), 29)
    if not os.path.exists(made["deepseek"]):
        layouts.write_sharded(os.path.dirname(made["deepseek"]), layouts.deepseek_specs(), 163)
    return made


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="only the 100,000-tensor safetensors rows")
    parser.add_argument("--pth", action="store_true", help="only the .pth rows (and their baselines)")
    parser.add_argument("--compare", metavar="TREE", help="also run each ckpt command from this checkout")
    parser.add_argument("--make-inputs", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.make_inputs:
        inputs()
        return
    # made in a child: writing the .pth imports torch, and a child's peak RSS (wait4) starts at its
    # parent's, so a parent that imported torch would report 700 MB for every command
    subprocess.run([PYTHON, __file__, "--make-inputs"], check=True)
    paths = inputs()
    print(f"load average at start: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")

    before: dict[str, Run] = {}
    # -P: no current directory on sys.path, so PYTHONPATH's tree is imported, not this one
    other = bench_env(PYTHONPATH=os.path.abspath(args.compare)) if args.compare else None

    def m(label: str, cmd: list[str]) -> Run:
        if other is not None and cmd[: len(CKPT)] == CKPT:
            then = [PYTHON, "-P", *cmd[1:]]
            runs = [
                measure(label, c, repeat=1, env=e) for _ in range(args.repeat) for c, e in ((then, other), (cmd, None))
            ]
            before[label] = min(runs[0::2], key=lambda r: r.wall_s)
            run = min(runs[1::2], key=lambda r: r.wall_s)
            print(
                f"  measured {label}: {run.wall_s:.3f} s, {run.peak_rss_mb:.1f} MB (before: "
                f"{before[label].wall_s:.3f} s, {before[label].peak_rss_mb:.1f} MB)",
                flush=True,
            )
            return run
        run = measure(label, cmd, repeat=args.repeat)
        print(f"  measured {label}: {run.wall_s:.3f} s, {run.peak_rss_mb:.1f} MB", flush=True)
        return run

    st = paths["flat.safetensors"]
    keys_cmd = [
        PYTHON,
        "-c",
        "import sys; from safetensors import safe_open; f = safe_open(sys.argv[1], 'np'); len(f.keys())",
        st,
    ]
    keys = m("safe_open(flat.safetensors).keys()", keys_cmd)
    runs: list[Run] = [keys]
    cases = [] if args.pth else [("flat.safetensors", st), ("sharded_st", paths["sharded_st"])]
    if not args.quick:
        runs.append(
            m(
                "torch.load(flat.pth, weights_only=True)",
                [PYTHON, "-c", "import sys, torch; torch.load(sys.argv[1], weights_only=True)", paths["flat.pth"]],
            )
        )
        cases += [("flat.pth", paths["flat.pth"]), ("sharded_pth", paths["sharded_pth"])]
    for name, path in cases:
        scan_target = os.path.dirname(path) if name.startswith("sharded") else path
        runs.append(m(f"inspect --json {name}", CKPT + ["inspect", path, "--json"]))
        runs.append(m(f"inspect {name} (folded table)", CKPT + ["inspect", path]))
        runs.append(m(f"scan {name}", CKPT + ["scan", scan_target]))
        runs.append(m(f"validate {name}", CKPT + ["validate", path]))
    if not args.pth:
        runs.append(m("diff flat.safetensors sharded_st", CKPT + ["diff", st, paths["sharded_st"]]))
    if not args.quick:
        runs.append(m("diff flat.pth sharded_pth", CKPT + ["diff", paths["flat.pth"], paths["sharded_pth"]]))
        runs.append(m("diff flat.safetensors flat.pth", CKPT + ["diff", st, paths["flat.pth"]]))
        for name in () if args.pth else ("llama70b", "deepseek"):
            runs.append(m(f"inspect {name}", CKPT + ["inspect", paths[name]]))
            runs.append(m(f"inspect --json {name}", CKPT + ["inspect", paths[name], "--json"]))
            runs.append(m(f"validate {name}", CKPT + ["validate", paths[name]]))
            runs.append(m(f"scan {name}", CKPT + ["scan", os.path.dirname(paths[name])]))
    # the 2x target, measured fairly: the two commands alternate, so both see the same machine
    # (keys() alone varies by 20% between runs here)
    ratio_runs = [
        measure(label, cmd, repeat=1)
        for _ in range(max(args.repeat, 5))
        for label, cmd in (
            ("keys()", keys_cmd),
            ("inspect --json", CKPT + ["inspect", st, "--json"]),
        )
    ]
    pair = (min(ratio_runs[0::2], key=lambda r: r.wall_s), min(ratio_runs[1::2], key=lambda r: r.wall_s))
    ratio = pair[1].wall_s / pair[0].wall_s
    print(
        f"  alternating, best of {len(ratio_runs) // 2}: keys() {pair[0].wall_s:.3f} s, inspect --json "
        f"{pair[1].wall_s:.3f} s: {ratio:.2f}x",
        flush=True,
    )
    print(f"{'command (best of ' + str(args.repeat) + ')':<44} {'wall s':>8} {'peak MB':>8} {'x keys()':>9}  target")
    for r in runs:
        target = ""
        if any(n in r.label for n in ("flat", "sharded")) and not r.label.startswith(("safe_open", "torch.load")):
            met = r.wall_s < 1.0 and r.peak_rss_mb < 200
            target = f"<1 s, <200 MB: {'met' if met else 'NOT met'}"
            if r.label == "inspect --json flat.safetensors":
                target += f"; <=2x keys() (alternating): {ratio:.2f}x, {'met' if ratio <= 2 else 'NOT met'}"
        was = before.get(r.label)
        if was is not None:
            target += f"; before {was.wall_s:.3f} s, {was.peak_rss_mb:.1f} MB ({was.wall_s / r.wall_s:.2f}x faster)"
        print(f"{r.label:<44} {r.wall_s:>8.3f} {r.peak_rss_mb:>8.1f} {r.wall_s / keys.wall_s:>9.2f}  {target}")
    print(f"load average at end: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")


if __name__ == "__main__":
    main()
