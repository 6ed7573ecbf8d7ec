"""What the fix-plan tests share: a directory with a models file, a state dict of distinct values, and
the printed ``ckpt migrate`` command run as a user would paste it (tiny HF configs: ``hf_configs``)."""

from __future__ import annotations

import shlex
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from click.testing import CliRunner
from torch import nn

from ckpt_tool.cli import main


def run(*args: Any) -> Any:
    return CliRunner().invoke(main, [str(a) for a in args])


def random_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """A state dict whose every tensor is distinct (random values, random running stats and counters)."""
    gen = torch.Generator().manual_seed(0)
    out = {}
    for k, v in model.state_dict().items():
        if v.dtype.is_floating_point:
            out[k] = torch.randn(v.shape, generator=gen)
        else:
            out[k] = torch.randint(0, 1000, v.shape, generator=gen, dtype=v.dtype)
    return out


def apply_suggested(report: Any, out: Path) -> Any:
    """Run the command diff printed (its -o replaced), as a user would paste it."""
    argv = shlex.split(report.plan.command)
    assert argv[:2] == ["ckpt", "migrate"]
    argv[argv.index("-o") + 1] = str(out)
    return run(*argv[1:])


def models_env(factory: pytest.TempPathFactory, name: str, models: str) -> Iterator[Path]:
    """A module-scoped directory holding ``models.py``, the current directory, with a cache of its own."""
    root = factory.mktemp(name)
    (root / "models.py").write_text(models)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("CKPT_CACHE_DIR", str(root / "cache"))
        mp.chdir(root)
        yield root
