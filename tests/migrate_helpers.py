"""Helpers shared by test_migrate.py and test_cli_migrate.py: real checkpoints and target factories."""

from __future__ import annotations

import os
import textwrap

import pytest

# target architectures the scenarios need, as file.py:factory specs
FACTORIES = '''
import torch
from torch import nn
import torchvision


def vgg16_add_linder():
    """vgg16 with one more layer after the 1000-way output: A is a subset of B."""
    model = torchvision.models.vgg16(weights=None)
    model.classifier.add_module("add_linder", nn.Linear(1000, 10))
    return model


def vgg16_without_head():
    """vgg16 whose classifier stops before classifier.6: B is a subset of A."""
    model = torchvision.models.vgg16(weights=None)
    model.classifier = nn.Sequential(*list(model.classifier)[:6])
    return model


class Tied(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(20, 8)
        self.proj = nn.Linear(8, 20, bias=False)
        self.proj.weight = self.embed.weight


def tied():
    return Tied()


def with_nan():
    model = nn.Linear(3, 2)
    with torch.no_grad():
        model.bias[0] = float("nan")
    return model
'''


def write_factories(directory: str) -> str:
    """Write the factories module; returns its path (use as ``PATH:vgg16_add_linder``)."""
    path = os.path.join(directory, "targets.py")
    with open(path, "w") as f:
        f.write(textwrap.dedent(FACTORIES))
    return path


def save_resnet(path: str, *, wrap: str | None = None, **kwargs):
    """Save a resnet18 state dict: plain, ``wrap="dp"`` (DataParallel keys) or ``wrap="nested"``.

    Returns the state dict as saved (the nested one for ``"nested"``).
    """
    import torch
    import torchvision

    torch.manual_seed(0)
    model = torchvision.models.resnet18(weights=None, **kwargs)
    if wrap == "dp":
        sd = torch.nn.DataParallel(model).state_dict()
        obj = sd
    elif wrap == "nested":
        sd = model.state_dict()
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        model(torch.randn(2, 3, 32, 32)).sum().backward()
        opt.step()
        obj = {
            "model_state_dict": sd,
            "optimizer_state_dict": opt.state_dict(),
            "epoch": 5,
            "config": {"lr": 0.1, "tags": ["a"]},
        }
    else:
        sd = model.state_dict()
        obj = sd
    torch.save(obj, path)
    return sd


def same_bytes(a, b) -> bool:
    """Same dtype, shape and bit pattern (NaN-safe, unlike torch.equal)."""
    import torch

    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    return torch.equal(a.contiguous().reshape(-1).view(torch.uint8), b.contiguous().reshape(-1).view(torch.uint8))


def temp_files(directory: str) -> list[str]:
    return [n for n in os.listdir(directory) if n.endswith(".tmp")]


@pytest.fixture(autouse=True, name="signature_cache")
def signature_cache_fixture(tmp_path, monkeypatch):
    """Each test gets its own target-signature cache (never the user's ~/.cache)."""
    monkeypatch.setenv("CKPT_CACHE_DIR", str(tmp_path / "cache"))


@pytest.fixture(scope="module", name="resnet")
def resnet_fixture(models):
    """A plain resnet18 state dict saved with torch.save (the session's: read it, never write it)."""
    return models.saved("resnet18")
