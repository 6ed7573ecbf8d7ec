"""Target architectures: torchvision names, ``package.module:factory``, ``file.py:factory``, ``timm:NAME``.

torch and torchvision are imported here only, and only when a model must be built.
"""

from __future__ import annotations

import ast
import importlib
import importlib.util
import os
from typing import Any

from .errors import ArchError, UsageError


def parse_arch_args(items: list[str] | tuple[str, ...]) -> dict[str, Any]:
    """``["num_classes=10", "dropout=0.2"]`` -> ``{"num_classes": 10, "dropout": 0.2}``.

    Values are Python literals; anything that is not one is kept as a string.
    """
    out: dict[str, Any] = {}
    for item in items:
        name, sep, value = item.partition("=")
        if not sep or not name.strip().isidentifier():
            raise UsageError(f"--arch-arg {item!r} is not NAME=VALUE")
        try:
            out[name.strip()] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            out[name.strip()] = value
    return out


def build_model(spec: str, arch_args: dict[str, Any] | None = None, device: str = "cpu") -> Any:
    """Build the ``nn.Module`` a spec names, with random weights (never downloads any).

    Args:
        spec: ``"vgg16"`` (torchvision), ``"pkg.module:factory"``, ``"path/to/file.py:factory"``
            or ``"timm:NAME"``.
        arch_args: keyword arguments for the factory.
        device: ``"meta"`` builds without allocating memory.
    """
    import torch

    args = dict(arch_args or {})
    factory = resolve_factory(spec, args)
    try:
        with torch.device(device):
            model = factory(**args)
    except ArchError:
        raise
    except TypeError as exc:
        raise ArchError(f"--arch {spec}: cannot build it with {args} ({exc})") from None
    except Exception as exc:  # noqa: BLE001 - user code can raise anything
        raise ArchError(f"--arch {spec}: building it failed: {type(exc).__name__}: {exc}") from None
    if not isinstance(model, torch.nn.Module):
        raise ArchError(f"--arch {spec}: the factory returned {type(model).__name__}, not an nn.Module")
    return model


def resolve_factory(spec: str, args: dict[str, Any]) -> Any:
    if spec.startswith("timm:"):
        try:
            timm = importlib.import_module("timm")
        except ImportError:
            raise ArchError(f"--arch {spec}: timm is not installed (pip install timm)") from None
        name = spec[len("timm:"):]
        args.setdefault("pretrained", False)
        return lambda **kw: timm.create_model(name, **kw)
    if ":" in spec:
        source, _, attr = spec.rpartition(":")
        if source.endswith(".py"):
            module = _load_file(source, spec)
        else:
            try:
                module = importlib.import_module(source)
            except ImportError as exc:
                raise ArchError(f"--arch {spec}: cannot import {source} ({exc})") from None
        factory = getattr(module, attr, None)
        if factory is None or not callable(factory):
            raise ArchError(f"--arch {spec}: {source} has no callable {attr!r}")
        return factory
    import torchvision

    names = set(torchvision.models.list_models())
    if spec not in names:
        near = sorted(n for n in names if spec.lower().rstrip("0123456789_") in n)[:8]
        hint = f" (did you mean {', '.join(near)}?)" if near else " (see torchvision.models.list_models())"
        raise ArchError(f"--arch {spec}: not a torchvision model{hint}")
    args.setdefault("weights", None)
    return lambda **kw: torchvision.models.get_model(spec, **kw)


def _load_file(source: str, spec: str) -> Any:
    if not os.path.isfile(source):
        raise ArchError(f"--arch {spec}: no such file {source}")
    name = "_ckpt_user_arch_" + os.path.splitext(os.path.basename(source))[0]
    module_spec = importlib.util.spec_from_file_location(name, source)
    if module_spec is None or module_spec.loader is None:
        raise ArchError(f"--arch {spec}: cannot load {source}")
    module = importlib.util.module_from_spec(module_spec)
    try:
        module_spec.loader.exec_module(module)
    except Exception as exc:  # noqa: BLE001 - user code
        raise ArchError(f"--arch {spec}: importing {source} failed: {type(exc).__name__}: {exc}") from None
    return module
