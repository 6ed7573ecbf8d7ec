"""Shared test factories: real checkpoints written with torch.save / safetensors under tmp dirs."""

from __future__ import annotations

import importlib.util
import os
import sys
from collections import OrderedDict

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXTURES = os.path.join(ROOT, "fixtures")
sys.path.insert(0, FIXTURES)
TORCH_MISSING = importlib.util.find_spec("torch") is None


def pytest_ignore_collect(collection_path, config):
    """Without torch (CI's core-only environment) only modules that hold torch-free tests are imported."""
    if TORCH_MISSING and collection_path.suffix == ".py" and collection_path.name.startswith("test_"):
        return "torchfree" not in collection_path.read_text(encoding="utf-8")
    return None


@pytest.fixture(scope="session", autouse=True)
def _private_cache(tmp_path_factory):
    """The suite never writes the user's cache (signatures, shape flows, dtype probes): one of its own
    for the session; modules that need a cache per test set theirs on top."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("CKPT_CACHE_DIR", str(tmp_path_factory.mktemp("cache")))
        yield


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


@pytest.fixture(scope="session")
def corpus(tmp_path_factory):
    """Real-world checkpoint layouts (tests/corpus.py), each built on first use and kept for the session."""
    from corpus import Corpus

    return Corpus(str(tmp_path_factory.mktemp("corpus")))


class Models:
    """torchvision models with random weights (seed 0), built once per session: their state dicts, and
    files of them saved with ``torch.save``. Tests read these and never write them (copy first)."""

    def __init__(self, directory: str) -> None:
        self.directory = directory
        self._states: dict[tuple, dict] = {}
        self._files: dict[tuple, str] = {}

    def state_dict(self, name: str, **kwargs) -> dict:
        key = (name, tuple(sorted(kwargs.items())))
        if key not in self._states:
            self._states[key] = self._build(name, kwargs)
        return self._states[key]

    def saved(self, name: str, **kwargs) -> str:
        """A ``.pth`` of the state dict (a big model's state dict is not kept in memory for it)."""
        key = (name, tuple(sorted(kwargs.items())))
        if key not in self._files:
            import torch

            path = os.path.join(self.directory, "_".join([name, *(f"{k}{v}" for k, v in key[1])]) + ".pth")
            torch.save(self._states.get(key) or self._build(name, kwargs), path)
            self._files[key] = path
        return self._files[key]

    @staticmethod
    def _build(name: str, kwargs: dict) -> dict:
        import torch
        import torchvision

        torch.manual_seed(0)
        return getattr(torchvision.models, name)(weights=None, **kwargs).state_dict()


@pytest.fixture(scope="session")
def models(tmp_path_factory):
    """The session's torchvision models (:class:`Models`)."""
    return Models(str(tmp_path_factory.mktemp("models")))


# Tests that need torch carry the `torch` marker: every test not marked `torchfree` (those CI runs
# again in a core-only environment) gets it, whether it imports torch or uses a fixture built with it.
# Without torch installed the torch tests are skipped with that reason instead of failing on an
# import; `pytest -m torchfree` runs the rest alone. The markers are registered in pyproject.toml.
TORCH_FIXTURES = {"torch", "example_inputs", "corpus", "models"}


def pytest_collection_modifyitems(config, items):
    missing = [m for m in ("torch", "torchvision") if importlib.util.find_spec(m) is None]
    for item in items:
        uses_torch = TORCH_FIXTURES & set(getattr(item, "fixturenames", ()))
        if item.get_closest_marker("torchfree") is None:
            item.add_marker(pytest.mark.torch)
        elif uses_torch:
            raise pytest.UsageError(f"{item.nodeid} is marked torchfree but uses {', '.join(sorted(uses_torch))}")
        if missing and item.get_closest_marker("torch"):
            item.add_marker(pytest.mark.skip(reason=f"needs {' and '.join(missing)}, not installed"))
