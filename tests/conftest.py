"""Shared test factories: real checkpoints written with torch.save / safetensors under tmp dirs."""

from __future__ import annotations

import os
import sys
from collections import OrderedDict

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXTURES = os.path.join(ROOT, "fixtures")
sys.path.insert(0, FIXTURES)


@pytest.fixture(scope="session")
def torch():
    import torch as _torch

    _torch.manual_seed(0)
    return _torch


def tiny_model():
    """The committed fixtures' model (features + classifier with named fc1/fc2)."""
    from make_fixtures import tiny_cnn

    return tiny_cnn()


class TiedLM:
    """Factory for a module whose output projection shares the embedding's weight."""

    @staticmethod
    def build():
        from torch import nn

        class Tied(nn.Module):
            def __init__(self) -> None:
                super().__init__()
                self.embed = nn.Embedding(20, 8)
                self.proj = nn.Linear(8, 20, bias=False)
                self.proj.weight = self.embed.weight

        return Tied()


def mixed_dtype_state(torch):
    """A state dict with bf16/fp16/int8/bool tensors, a transposed view and an offset slice."""
    base = torch.arange(24, dtype=torch.float32).reshape(4, 6)
    return OrderedDict(
        bf16=torch.randn(3, 5).to(torch.bfloat16),
        fp16=torch.randn(7).to(torch.float16),
        int8=torch.randint(-100, 100, (4, 4), dtype=torch.int8),
        flag=torch.tensor([True, False, True]),
        transposed=base.t(),
        sliced=base[1:3, 2:5],
        scalar=torch.tensor(3.5, dtype=torch.float64),
        empty=torch.zeros(0, 3),
    )


def rewrite_zip(src, dst, edit) -> None:
    """Copy a zip archive entry by entry; ``edit(name, data)`` returns new bytes, or None to leave it out."""
    import zipfile

    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w") as zout:
        for info in zin.infolist():
            data = edit(info.filename, zin.read(info))
            if data is not None:
                zout.writestr(info, data)


@pytest.fixture(scope="session")
def example_inputs(tmp_path_factory):
    """The inputs of the documentation's examples (docs/make_examples.py), built once per session."""
    sys.path.insert(0, os.path.join(ROOT, "docs"))
    import make_examples

    path = str(tmp_path_factory.mktemp("docs") / "inputs")
    make_examples.make(path)
    return path


# Tests that need torch carry the `torch` marker: explicitly (@pytest.mark.torch), or because they use a
# fixture that builds with torch. Without torch installed they are skipped with that reason instead of
# failing on an import; `pytest -m "not torch"` runs the rest alone.
TORCH_FIXTURES = {"torch", "example_inputs"}


def pytest_configure(config):
    config.addinivalue_line("markers", "torch: needs torch and torchvision; skipped when they are not installed")


def pytest_collection_modifyitems(config, items):
    import importlib.util

    missing = [m for m in ("torch", "torchvision") if importlib.util.find_spec(m) is None]
    for item in items:
        if TORCH_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.torch)
        if missing and item.get_closest_marker("torch"):
            item.add_marker(pytest.mark.skip(reason=f"needs {' and '.join(missing)}, not installed"))
