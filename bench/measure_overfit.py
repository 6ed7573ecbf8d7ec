"""The measurements behind the overfit-one-batch criterion: loss and batch accuracy per step, per seed.

For each setup (healthy ones from the README's worked examples and the test models, and broken
ones: learning rate 1e6, a head detached from the graph, labels shuffled at every step) and each
seed, it runs ``overfit_one_batch`` for ``--steps`` steps at the rates ``finetune_check`` would try
(a setup without ``lr`` is the command without ``--lr``: the default, lowered when the loss
diverges) and prints one JSON line per run with the losses and accuracies, then a summary per
setup: the worst ratio last/first loss and the worst batch accuracy after 5, 10, 15, 20 steps; and
at the end a markdown table, one row per run, as in docs/commands/finetune-check.md.

Run: ``python bench/measure_overfit.py [--seeds 0-9] [--steps 20] [--only NAME,...]``. The vgg16
sweep of the docs (about 40 s a run on two quiet cores):
``python bench/measure_overfit.py --only vgg16-ff10,vgg16-ff10-lr1e-3,vgg16-ff10-lr1e-4``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

TINY = '''
import torch
from torch import nn


class Tiny(nn.Module):
    def __init__(self, num_classes=10):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.AdaptiveAvgPool2d(2))
        self.classifier = nn.Sequential(nn.Dropout(0.5), nn.Linear(32, num_classes))

    def forward(self, x):
        return self.classifier(torch.flatten(self.features(x), 1))


class Detached(Tiny):
    """The head's output is cut from the graph; a spare scale keeps backward() working."""

    def __init__(self, num_classes=10):
        super().__init__(num_classes)
        self.scale = nn.Parameter(torch.ones(()))

    def forward(self, x):
        return super().forward(x).detach() * 0 + self.scale * 0 + super().forward(x).detach()


def tiny(**kw):
    return Tiny(**kw)


def vgg16_detached(**kw):
    """torchvision's vgg16 whose logits are cut from the graph (a spare parameter keeps backward() working)."""
    import torchvision

    model = torchvision.models.vgg16(weights=None, **kw)
    model.spare = nn.Parameter(torch.zeros(()))
    forward = model.forward
    model.forward = lambda x: forward(x).detach() + 0 * model.spare
    return model


def detached(**kw):
    return Detached(**kw)
'''

# name -> (arch, FinetuneOptions fields, how it is broken: None, "shuffled" labels at every step, or
# "frozen": every parameter frozen). No --image-size: the command's default (on the CPU, 112 px for
# synthetic data; see finetune/data.py)
FF10 = dict(num_classes=10, freeze_first=10)  # the README's vgg16 recipe, with the command's defaults
SETUPS = {
    "tiny": ("tiny", dict(image_size=32, batch_size=16, lr=0.01), None),
    "tiny-shuffled": ("tiny", dict(image_size=32, batch_size=16, lr=0.01), "shuffled"),
    "tiny-lr1e6": ("tiny", dict(image_size=32, batch_size=16, lr=1e6, optimizer="sgd"), None),
    "tiny-detached": ("detached", dict(image_size=32, batch_size=16, lr=0.01), None),
    "resnet18-fc-64": ("resnet18", dict(num_classes=10, trainable=("fc",), image_size=64), None),
    "resnet18-fc-64-shuffled": ("resnet18", dict(num_classes=10, trainable=("fc",), image_size=64), "shuffled"),
    "resnet18-32": ("resnet18", dict(num_classes=10, image_size=32), None),
    "resnet18-32-lr1e6": ("resnet18", dict(num_classes=10, image_size=32, lr=1e6, optimizer="sgd"), None),
    "resnet18-32-shuffled": ("resnet18", dict(num_classes=10, image_size=32), "shuffled"),
    "resnet18-224": ("resnet18", dict(num_classes=10, image_size=224), None),
    "resnet18-default": ("resnet18", dict(num_classes=10), None),
    "vgg16-ff10-64": (
        "vgg16",
        dict(num_classes=10, freeze_first=10, image_size=64, batch_size=8, optimizer="sgd", lr=0.01),
        None,
    ),
    "vgg16-ff10-224": ("vgg16", dict(FF10, image_size=224), None),
    "vgg16-ff10": ("vgg16", FF10, None),
    "vgg16-ff10-lr1e-3": ("vgg16", dict(FF10, lr=1e-3), None),
    "vgg16-ff10-lr1e-4": ("vgg16", dict(FF10, lr=1e-4), None),
    "vgg16-ff10-frozen": ("vgg16", FF10, "frozen"),
    "vgg16-ff10-lr1e6": ("vgg16", dict(FF10, lr=1e6, optimizer="sgd"), None),
    "vgg16-ff10-shuffled": ("vgg16", FF10, "shuffled"),
    "vgg16-ff10-detached": ("vgg16_detached", FF10, None),
}


def prepare(arch: str, ckpt: str, opts: object) -> tuple[object, tuple[object, object], object]:
    """The model, loaded and frozen as finetune_check does, and its first training batch."""
    import torch

    from ckpt_tool.arch import build_model
    from ckpt_tool.finetune.data import _input_channels, _input_spec, make_datasets, make_loaders, training_size
    from ckpt_tool.finetune.freeze import apply_trainable, model_frozen, phase_plan
    from ckpt_tool.finetune.head import find_head, replace_head
    from ckpt_tool.finetune.load import _load_into, _migrated_state
    from ckpt_tool.reader import open_checkpoint

    torch.manual_seed(opts.seed)
    model = build_model(arch, {}, device="cpu")
    head = replace_head(model, opts.num_classes) if opts.num_classes else None
    by_model = model_frozen(model)
    state, ops, init = _migrated_state(open_checkpoint(ckpt), opts, model)
    _load_into(model, state, (head.module,) if head else (), ops, init)
    heads = (head.module,) if head else (find_head(model, None),)
    apply_trainable(model, phase_plan(model, opts, heads, by_model)[0].trainable)
    device = torch.device("cpu")
    channels = _input_channels(model)
    size, mean, std = _input_spec(arch, opts.image_size)
    size = training_size(model, opts, device, size, channels)
    logits = 10 if opts.num_classes is None else opts.num_classes
    train, _ = make_loaders(
        make_datasets(opts, size, channels, logits, mean, std), opts.batch_size, opts.seed, shuffle=False
    )
    return model, next(iter(train)), device


def main() -> None:
    import torch

    from ckpt_tool.finetune import FinetuneOptions
    from ckpt_tool.finetune.checks import overfit_verdict
    from ckpt_tool.finetune.options import learning_rate
    from ckpt_tool.finetune.train import overfit_lrs, overfit_one_batch

    parser = argparse.ArgumentParser()
    parser.add_argument("--seeds", default="0-9")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--only", default="")
    args = parser.parse_args()
    lo, _, hi = args.seeds.partition("-")
    seeds = range(int(lo), int(hi or lo) + 1)
    tmp = tempfile.mkdtemp()
    with open(os.path.join(tmp, "tiny_models.py"), "w") as f:
        f.write(TINY)
    sys.path.insert(0, tmp)
    import tiny_models
    from _common import torchvision_pth

    files = {"tiny": os.path.join(tmp, "tiny.pth"), "detached": os.path.join(tmp, "detached.pth")}
    torch.save(tiny_models.Tiny().state_dict(), files["tiny"])
    torch.save(tiny_models.Detached().state_dict(), files["detached"])
    arches = {
        "tiny": f"{tmp}/tiny_models.py:tiny",
        "detached": f"{tmp}/tiny_models.py:detached",
        "vgg16_detached": f"{tmp}/tiny_models.py:vgg16_detached",
    }
    table: list[str] = []
    for name, (arch, fields, broken) in SETUPS.items():
        if args.only and name not in args.only.split(","):
            continue
        ckpt = files.get(arch) or torchvision_pth(arch.removesuffix("_detached"))
        rows = []
        verdicts: list[str] = []
        for seed in seeds:
            opts = FinetuneOptions(seed=seed, **fields)
            model, batch, device = prepare(arches.get(arch, arch), ckpt, opts)
            if broken == "frozen":
                model.requires_grad_(False)
            gen = torch.Generator().manual_seed(seed)
            relabel = (
                (lambda step, y, gen=gen: y[torch.randperm(len(y), generator=gen)]) if broken == "shuffled" else None
            )
            start = time.perf_counter()
            # the rates finetune_check tries: the default ones unless the setup gives --lr
            lrs = overfit_lrs(learning_rate(opts), given=opts.lr is not None)
            run = overfit_one_batch(model, batch, args.steps, opts.optimizer, lrs, device, relabel=relabel)
            rows.append(run)
            verdict = overfit_verdict(run, 10 if opts.num_classes is None else opts.num_classes)
            verdicts.append(verdict.status)
            seconds = time.perf_counter() - start
            table.append(table_row(name, seed, run, verdict.status, seconds))
            print(
                json.dumps(
                    {
                        "setup": name,
                        "seed": seed,
                        "s": round(seconds, 1),
                        "px": int(batch[0].shape[-1]),
                        "verdict": verdict.status,
                        "lr": run.lr,
                        "diverged": [[d.lr, d.step, round(d.loss, 4)] for d in run.diverged],
                        "losses": [round(v, 4) for v in run.losses],
                        "acc": [round(a, 3) for a in run.accuracies],
                        "final": [run.final_loss, run.final_accuracy],
                        "error": run.error,
                    }
                ),
                flush=True,
            )
        peaks = [max(r.losses) / r.losses[0] for r in rows if r.losses and r.losses[0]]
        print(
            f"# {name}: verdicts {' '.join(verdicts)}; highest step loss over the first: worst "
            f"{max(peaks, default=float('nan')):.3g}",
            flush=True,
        )
        for n in (5, 10, 15, 20, 30):
            if n > args.steps:
                break

            # after n steps: the loss/accuracy measured at the start of step n (or the final pass)
            def at(run, n=n):
                if run.error or not run.losses or run.final_loss is None:
                    return float("nan"), 0.0
                if n < len(run.losses):
                    return run.losses[n] / run.losses[0], run.accuracies[n]
                return run.final_loss / run.losses[0], run.final_accuracy

            values = [at(r) for r in rows]
            print(
                f"# {name} after {n:2d} steps: ratio worst {max(v[0] for v in values):.3f} best "
                f"{min(v[0] for v in values):.3f}; batch accuracy worst {min(v[1] for v in values):.2f} best "
                f"{max(v[1] for v in values):.2f}",
                flush=True,
            )
    print("\n| setup | seed | lr | first loss | last loss | highest step / first | batch accuracy | verdict | s |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    print("\n".join(table))


def table_row(name: str, seed: int, run: object, verdict: str, seconds: float) -> str:
    """One markdown row: the rate the verdict is on (and the rates given up before it), the losses, the verdict."""
    if run.error or not run.losses:
        return f"| {name} | {seed} | - | - | - | - | - | {verdict} | {seconds:.0f} |"
    lr = f"{run.lr:g}" + "".join(f" (at {d.lr:g}: {d.loss:.4g} at step {d.step})" for d in run.diverged)
    first = run.losses[0]
    return (
        f"| {name} | {seed} | {lr} | {first:.4f} | {run.final_loss:.4f} | {max(run.losses) / first:.3g} | "
        f"{run.final_accuracy:.0%} | {verdict} | {seconds:.0f} |"
    )


if __name__ == "__main__":
    main()
