"""Target architectures: torchvision names, ``package.module:factory``, ``file.py:factory``, ``timm:NAME``.

torch and torchvision are imported here only, and only when a model must be built.
"""

from __future__ import annotations

import ast
import difflib
import hashlib
import importlib
import importlib.util
import json
import os
import sys
import tempfile
from dataclasses import dataclass
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
    from .torch_extra import require_torch

    require_torch(f"--arch {spec}: building the model", torchvision=":" not in spec)
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
        near = difflib.get_close_matches(spec.lower(), sorted(names), n=6, cutoff=0.6)
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


# --- target signatures: key -> (shape, dtype) of a model's state dict, cached on disk ----------------------

SIGNATURE_SCHEMA = 1


@dataclass(frozen=True)
class TargetTensor:
    """One entry of a model's ``state_dict()``: what ``load_state_dict`` will expect under its key."""

    shape: tuple[int, ...]
    dtype: str
    kind: str  # "parameter" or "buffer"


@dataclass(frozen=True)
class TargetSignature:
    """The state-dict layout of an architecture, built on the meta device or read from the cache.

    ``auto_filled`` lists keys torch fills in itself when a state dict without version metadata
    lacks them (BatchNorm's ``num_batches_tracked``). ``cache`` says where the table came from:
    ``hit``, ``built`` (and stored), ``rebuilt`` (a stale or corrupt entry was replaced), ``off``
    (``use_cache=False``), ``uncacheable`` (user code whose source file cannot be fingerprinted) or
    ``unwritable`` (built, but the cache directory cannot be written).
    """

    spec: str
    arch_args: dict[str, Any]
    tensors: dict[str, TargetTensor]
    auto_filled: tuple[str, ...] = ()
    cache: str = "off"


def signature_of(model: Any) -> tuple[dict[str, TargetTensor], tuple[str, ...]]:
    """The state-dict layout of an ``nn.Module`` (works on meta tensors: no values are touched)."""
    import torch

    params = {name for name, _ in model.named_parameters(remove_duplicate=False)}
    tensors = {
        key: TargetTensor(tuple(int(d) for d in value.shape), str(value.dtype).removeprefix("torch."),
                          "parameter" if key in params else "buffer")
        for key, value in model.state_dict().items()
        if isinstance(value, torch.Tensor)
    }
    norm_base = torch.nn.modules.batchnorm._NormBase
    auto = tuple(
        f"{name}.num_batches_tracked" if name else "num_batches_tracked"
        for name, module in model.named_modules()
        if isinstance(module, norm_base) and module.track_running_stats
    )
    return tensors, tuple(k for k in auto if k in tensors)


def target_signature(spec: str, arch_args: dict[str, Any] | None = None, *, use_cache: bool = True,
                     cache_dir: str | None = None) -> TargetSignature:
    """The key/shape/dtype table of ``spec``'s model, from the cache when a valid entry exists.

    A cache hit imports neither torch nor torchvision. Entries are keyed by the spec, its
    arguments, the torch/torchvision (and timm) versions and, for user code, the source file's
    sha256; an entry that does not match its key or its checksum is rebuilt, never trusted.

    Example:
        >>> sig = target_signature("resnet18", {"num_classes": 10})
        >>> sig.tensors["fc.weight"].shape
        (10, 512)
    """
    args = dict(arch_args or {})
    from .arch_table import lookup  # torchvision's classification models, shipped: no torch import

    shipped = lookup(spec, args) if use_cache else None  # use_cache=False: build afresh, whatever is stored
    if shipped is not None:  # cache "table": from ckpt's shipped signatures
        return TargetSignature(spec, args, shipped.tensors, shipped.auto_filled, "table")
    key = _cache_key(spec, args) if use_cache else None
    path = os.path.join(cache_dir or default_cache_dir(), _entry_name(key)) if key is not None else None
    status = "off" if not use_cache else "uncacheable"
    if path is not None and key is not None:
        cached, status = _read_entry(path, key)
        if cached is not None:
            tensors, auto = cached
            return TargetSignature(spec, args, tensors, auto, "hit")
    try:
        model = build_model(spec, args, device="meta")
    except ArchError:
        # some user code cannot run on meta tensors (it calls .item(), numpy, ...): build it for real
        model = build_model(spec, args, device="cpu")
    tensors, auto = signature_of(model)
    if path is not None and key is not None:
        status = "rebuilt" if status == "corrupt" else "built"
        if not _write_entry(path, key, tensors, auto):
            status = "unwritable"
    return TargetSignature(spec, args, tensors, auto, status)


def default_cache_dir() -> str:
    """``$CKPT_CACHE_DIR``, else ``$XDG_CACHE_HOME/ckpt``, else ``~/.cache/ckpt``; signatures live in ``signatures/``."""
    base = os.environ.get("CKPT_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "ckpt")
    return os.path.join(base, "signatures")


def _version(dist: str) -> str | None:
    from importlib import metadata

    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def _cache_key(spec: str, args: dict[str, Any]) -> dict[str, Any] | None:
    """What a cached signature depends on, or ``None`` when user code cannot be fingerprinted."""
    key: dict[str, Any] = {
        "schema": SIGNATURE_SCHEMA, "spec": spec, "args": repr(sorted(args.items())),
        "torch": _version("torch"), "torchvision": _version("torchvision"),
    }
    if spec.startswith("timm:"):
        key["timm"] = _version("timm")
    elif ":" in spec:
        source, _, attr = spec.rpartition(":")
        file = source if source.endswith(".py") else _module_file(source)
        if file is None or not os.path.isfile(file):
            return None
        key["spec"] = f"{os.path.abspath(file)}:{attr}" if source.endswith(".py") else spec
        with open(file, "rb") as f:
            key["source_sha256"] = hashlib.sha256(f.read()).hexdigest()
    return key


def _module_file(dotted: str) -> str | None:
    """The source file of ``pkg.module`` found on ``sys.path`` without importing anything (which find_spec would)."""
    parts = dotted.split(".")
    for entry in sys.path:
        base = os.path.join(entry or os.getcwd(), *parts)
        for candidate in (base + ".py", os.path.join(base, "__init__.py")):
            if os.path.isfile(candidate):
                return candidate
    return None


def _entry_name(key: dict[str, Any] | None) -> str:
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:32] + ".json"


def _checksum(key: dict[str, Any], tensors: list[Any], auto: list[str]) -> str:
    return hashlib.sha256(json.dumps([key, tensors, auto], sort_keys=True).encode()).hexdigest()


def _read_entry(path: str, key: dict[str, Any]) -> tuple[tuple[dict[str, TargetTensor], tuple[str, ...]] | None, str]:
    """``(signature, "hit")``, or ``(None, "missing" | "corrupt")``; a bad entry is reported, never used."""
    try:
        with open(path, encoding="utf-8") as f:
            entry = json.load(f)
    except FileNotFoundError:
        return None, "missing"
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError):
        return None, "corrupt"
    try:
        rows, auto = entry["tensors"], entry["auto_filled"]
        if entry["key"] != key or entry["checksum"] != _checksum(key, rows, auto):
            return None, "corrupt"
        tensors = {str(k): TargetTensor(tuple(int(d) for d in shape), str(dtype), str(kind))
                   for k, shape, dtype, kind in rows}
        return (tensors, tuple(str(a) for a in auto)), "hit"
    except (KeyError, TypeError, ValueError):
        return None, "corrupt"


def _write_entry(path: str, key: dict[str, Any], tensors: dict[str, TargetTensor], auto: tuple[str, ...]) -> bool:
    """Store an entry atomically (temp file + rename), so a reader never sees half of one."""
    rows = [[k, list(t.shape), t.dtype, t.kind] for k, t in tensors.items()]
    entry = {"key": key, "tensors": rows, "auto_filled": list(auto), "checksum": _checksum(key, rows, list(auto))}
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".json", dir=os.path.dirname(path))
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                json.dump(entry, f)
            os.replace(tmp, path)
        except BaseException:
            os.unlink(tmp)
            raise
    except OSError:
        return False
    return True
