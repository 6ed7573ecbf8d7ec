"""Shipped signatures of torchvision's classification models: ``--arch resnet18`` without torch.

``data/torchvision_signatures.json.gz`` holds, for every classification model of one torchvision
release, what ``target_signature`` would build on the meta device: keys, shapes, dtypes, kinds, the
keys torch fills in itself and the tie groups. ``scripts/make_torchvision_signatures.py`` writes it;
``tests/test_arch_table.py`` rebuilds every model and compares, key by key.

The table answers only what it states exactly: default arguments, or ``num_classes=N`` where the
generator proved that the class count sits in one dimension of the head keys and changes nothing
else. When an installed torchvision has another version, it wins: ``lookup`` returns ``None`` and
the caller builds the model (and caches its signature) as before.
"""

from __future__ import annotations

import difflib
import functools
import gzip
import importlib.util
import json
import os
import re
from dataclasses import dataclass
from typing import Any

from .arch import TargetTensor
from .errors import ArchError
from .torch_extra import has

SCHEMA = 1
TABLE_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "torchvision_signatures.json.gz")
_FLOAT_PARAMETER = ("float32", "parameter")  # most rows: written as [key, shape] alone


@dataclass(frozen=True)
class ShippedSignature:
    """One model's entry: ``tensors`` and ``auto_filled`` as :class:`~ckpt_tool.arch.TargetSignature` has them."""

    name: str
    tensors: dict[str, TargetTensor]
    auto_filled: tuple[str, ...]
    ties: tuple[tuple[str, ...], ...]
    torchvision: str  # the release the table was generated from


def encode_rows(tensors: dict[str, TargetTensor]) -> list[list[Any]]:
    """``[key, shape]`` for float32 parameters, ``[key, shape, dtype, kind]`` for the rest."""
    return [
        [k, list(t.shape)] if (t.dtype, t.kind) == _FLOAT_PARAMETER else [k, list(t.shape), t.dtype, t.kind]
        for k, t in tensors.items()
    ]


def tie_groups(model: Any) -> tuple[tuple[str, ...], ...]:
    """State-dict names that are one tensor object on a built ``nn.Module`` (shared parameters or buffers)."""
    names: dict[int, list[str]] = {}
    for key, value in model.state_dict(keep_vars=True).items():
        names.setdefault(id(value), []).append(key)
    return tuple(sorted(tuple(sorted(group)) for group in names.values() if len(group) > 1))


def build_for_signature(name: str, args: dict[str, Any]) -> Any:
    """Build torchvision model ``name`` for its layout alone (the generator and the drift test use it).

    On the meta device; a model whose constructor reads values (regnet's width schedule) is built
    on the CPU with ``torch.nn.init`` switched off, so nothing is initialised and untouched memory
    stays unallocated: regnet_y_128gf takes a fraction of a second instead of ten.
    """
    from unittest import mock

    import torch

    from .arch import build_model

    try:
        return build_model(name, args, device="meta")
    except ArchError:
        pass
    init = torch.nn.init
    noops = [
        mock.patch.object(init, fn, lambda tensor, *a, **k: tensor)
        for fn in dir(init)
        if fn.endswith("_") and not fn.startswith("_")
    ]
    for patch in noops:
        patch.start()
    try:
        return build_model(name, args, device="cpu")
    finally:
        for patch in noops:
            patch.stop()


def _decode_rows(rows: list[list[Any]]) -> dict[str, TargetTensor]:
    out = {}
    for row in rows:
        dtype, kind = (row[2], row[3]) if len(row) == 4 else _FLOAT_PARAMETER
        out[row[0]] = TargetTensor(tuple(row[1]), dtype, kind)
    return out


@functools.cache
def _table() -> dict[str, Any]:
    with gzip.open(TABLE_PATH, "rb") as f:
        table: dict[str, Any] = json.loads(f.read())
    if table.get("schema") != SCHEMA:
        raise ArchError(f"{TABLE_PATH}: schema {table.get('schema')!r}, expected {SCHEMA} (a broken install?)")
    return table


def table_version() -> str:
    """The torchvision release the shipped table describes (``"0.29.1"``)."""
    return str(_table()["torchvision"])


def names() -> tuple[str, ...]:
    return tuple(sorted(_table()["models"]))


def _installed_torchvision() -> str | None:
    """The installed torchvision's version without its local part (``+cu130``); nothing is imported.

    Read from ``torchvision/version.py`` (a generated line, ``__version__ = '0.29.1+cu130'``): it
    costs a file read, where ``importlib.metadata`` would import the email package first.
    """
    try:
        spec = importlib.util.find_spec("torchvision")
    except (ImportError, ValueError):
        return None
    if spec is None:
        return None
    try:
        with open(os.path.join(os.path.dirname(spec.origin or ""), "version.py"), encoding="utf-8") as f:
            found = re.search(r"^__version__\s*=\s*['\"]([^'\"]+)['\"]", f.read(4096), re.M)
    except OSError:
        found = None
    if found is not None:
        return found.group(1).split("+")[0]
    from importlib import metadata

    try:
        return metadata.version("torchvision").split("+")[0]
    except metadata.PackageNotFoundError:
        return None


def lookup(spec: str, args: dict[str, Any]) -> ShippedSignature | None:
    """The shipped signature of torchvision model ``spec`` built with ``args``, or ``None`` to build it.

    ``None`` for user code and timm specs, for names the table lacks (detection models, a newer
    torchvision's additions), for arguments the table cannot state exactly, and whenever the
    installed torchvision is another release than the table's.

    Example:
        >>> lookup("resnet18", {"num_classes": 10}).tensors["fc.weight"].shape
        (10, 512)
    """
    if ":" in spec:
        return None
    installed = _installed_torchvision()
    table = _table()
    if installed is not None and installed != table["torchvision"]:
        return None
    text = table["models"].get(spec)
    if text is None:
        if installed is None:
            _refuse_unknown(spec)
        return None
    entry = json.loads(text)
    rest = {k: v for k, v in args.items() if not (k == "weights" and v is None)}
    classes = rest.pop("num_classes", None)
    rule = entry["num_classes"]
    if rest or (classes is not None and (rule is None or type(classes) is not int or classes < 1)):
        return None  # arguments the table cannot state: build the model
    tensors = _decode_rows(entry["tensors"])
    if classes is not None:
        for key, dim in rule["head"].items():
            t = tensors[key]
            tensors[key] = TargetTensor(t.shape[:dim] + (classes,) + t.shape[dim + 1 :], t.dtype, t.kind)
    return ShippedSignature(
        spec, tensors, tuple(entry["auto_filled"]), tuple(tuple(g) for g in entry["ties"]), table["torchvision"]
    )


def _refuse_unknown(spec: str) -> None:
    """Without torchvision, a name close to a table entry is a typo: say so (other names need torchvision)."""
    near = difflib.get_close_matches(spec.lower(), names(), n=6, cutoff=0.6)
    if near and not has("torchvision"):
        raise ArchError(f"--arch {spec}: not a torchvision classification model (did you mean {', '.join(near)}?)")
