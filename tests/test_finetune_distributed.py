"""finetune-check on torch.distributed: 2 CPU processes (gloo) under torchrun, one report from rank 0."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

MODELS = '''
import os

import torch
from torch import nn


class Tiny(nn.Module):
    def __init__(self, num_classes=10):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                                      nn.AdaptiveAvgPool2d(4))
        self.classifier = nn.Linear(256, num_classes)

    def forward(self, x):
        return self.classifier(torch.flatten(self.features(x), 1))


class RankDrift(Tiny):
    """Nudges the first layer by a different amount on each rank, behind the optimiser's back."""

    def forward(self, x):
        if self.training:
            with torch.no_grad():
                self.features[0].weight.add_(1e-3 * (1 + int(os.environ.get("RANK", "0"))))
        return super().forward(x)


def tiny(**kw):
    return Tiny(**kw)


def rank_drift(**kw):
    return RankDrift(**kw)
'''
ARGS = [
    "--image-size",
    "16",
    "--batch-size",
    "8",
    "--max-steps",
    "2",
    "--eval-batches",
    "1",
    "--lr",
    "0.01",
    "--device",
    "cpu",
    "--data",
    "synthetic:32",
    "--quiet",
]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    import importlib.util

    import torch

    root = tmp_path_factory.mktemp("ddp")
    (root / "ddp_models.py").write_text(MODELS)
    spec = importlib.util.spec_from_file_location("ddp_models_for_tests", root / "ddp_models.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    torch.manual_seed(0)
    torch.save(mod.Tiny().state_dict(), root / "tiny.pth")
    return root


def ckpt(*args: str, cwd) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, "-m", "ckpt_tool", "finetune-check", *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        env=env,
        timeout=300,
    )


def test_two_processes_under_torchrun_give_one_passing_report(files):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node=2",
            "-m",
            "ckpt_tool",
            "finetune-check",
            "tiny.pth",
            "--arch",
            "ddp_models.py:tiny",
            "--json",
            "--epochs",
            "2",
            "--freeze-epochs",
            "1",
            *ARGS,
        ],
        capture_output=True,
        text=True,
        cwd=files,
        env=env,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout)  # one JSON document: only rank 0 prints
    assert report["world_size"] == 2 and report["passed"] is True
    checks = {c["name"]: (c["status"], c["detail"]) for c in report["checks"]}
    assert checks["frozen identical on ranks"] == ("pass", "4 frozen tensors bit-identical on all 2 ranks")
    assert checks["gradients all-reduced"][0] == "pass" and "(gloo)" in checks["gradients all-reduced"][1]
    assert checks["loss finite on all ranks"] == ("pass", "every step on all 2 ranks")
    assert "over 2 ranks" in checks["throughput"][1]
    # 32 images in batches of 8 on 2 ranks: 2 steps per rank and epoch
    assert [p["steps"] for p in report["phases"]] == [2, 2]


def test_nproc_launches_torchrun_and_returns_rank_0s_verdict(files):
    result = ckpt(
        "tiny.pth", "--arch", "ddp_models.py:rank_drift", "--freeze", "features.0", "--nproc", "2", *ARGS, cwd=files
    )
    assert result.returncode == 1, result.stderr[-3000:]
    out = result.stdout
    assert out.count("FAIL: ") == 1 and "x 2 processes" in out
    lines = {line.split("  ")[0]: line for line in out.splitlines() if "  FAIL  " in line or "  PASS  " in line}
    assert "features.0.weight" in lines["frozen identical on ranks"] and "FAIL" in lines["frozen identical on ranks"]
    assert "PASS" in lines["gradients all-reduced"]


def test_nproc_argument_errors_are_one_line_before_launching(files):
    result = ckpt("tiny.pth", "--arch", "ddp_models.py:tiny", "--nproc", "2", "--epochs", "0", cwd=files)
    assert result.returncode == 2 and result.stderr.strip() == "ckpt: error: --epochs must be at least 1, got 0"


@pytest.mark.parametrize(
    ("device", "cuda", "backend"),
    [("cuda", True, "nccl"), ("auto", True, "nccl"), ("auto", False, "gloo"), ("cpu", True, "gloo")],
)
def test_the_backend_is_nccl_on_cuda_and_gloo_on_the_cpu(monkeypatch, device, cuda, backend):
    """No GPU here: the process group and CUDA are stubbed, so only the choice torchrun's rank makes is tested."""
    import torch
    import torch.distributed as dist

    from ckpt_tool.finetune.distributed import device_for, from_environment

    calls: list[tuple[str, object]] = []
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setattr(dist, "is_initialized", lambda: False)
    monkeypatch.setattr(dist, "init_process_group", lambda name, **kw: calls.append(("init", name)))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    monkeypatch.setattr(torch.cuda, "set_device", lambda index: calls.append(("set_device", index)))
    ranks = from_environment(device)
    assert (ranks.rank, ranks.world, ranks.backend, ranks.owned) == (1, 2, backend, True)
    assert calls == ([("set_device", 1)] if backend == "nccl" else []) + [("init", backend)]
    if backend == "nccl":
        assert device_for(ranks, torch.device("cuda")) == torch.device("cuda", 1)
    ranks.owned = False  # nothing to destroy: the group was never made
