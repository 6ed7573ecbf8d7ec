"""Write ckpt_tool/data/torchvision_signatures.json.gz: every torchvision classification model's signature.

Each model is built on the meta device at its default arguments (``weights=None``): its state-dict
keys with shape, dtype and kind, the keys torch fills in itself (``num_batches_tracked``), the tie
groups (names of one parameter or buffer), and the rule ``num_classes`` follows: which dimension
of which head key is the class count, checked by building again with two other counts. A model
whose keys change otherwise with ``num_classes`` gets no rule (ckpt builds it instead).

Run it after upgrading torchvision, then run ``pytest -m slow`` (tests/test_arch_table.py):

    python scripts/make_torchvision_signatures.py
"""

from __future__ import annotations

import gzip
import json
import os
import sys
import warnings
from typing import Any

import torch
import torchvision

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from ckpt_tool.arch import signature_of  # noqa: E402
from ckpt_tool.arch_table import SCHEMA, TABLE_PATH, build_for_signature, encode_rows, tie_groups  # noqa: E402

_PROBES = (7, 13)  # class counts that cannot be confused with any other dimension of these models


def describe(name: str, **args: Any) -> dict[str, Any]:
    model = build_for_signature(name, args)
    tensors, auto = signature_of(model)
    return {"rows": encode_rows(tensors), "auto_filled": list(auto), "ties": tie_groups(model), "tensors": tensors}


def head_rule(name: str, default: dict[str, Any]) -> dict[str, int] | None:
    """``{key: dim}`` where the class count sits, if that alone changes between class counts; else ``None``."""
    base = default["tensors"]
    rule: dict[str, int] | None = None
    for n in _PROBES:
        other = describe(name, num_classes=n)["tensors"]
        if set(other) != set(base):
            return None
        found: dict[str, int] = {}
        for key, t in base.items():
            o = other[key]
            if o.shape == t.shape and o.dtype == t.dtype:
                continue
            changed = [i for i, (a, b) in enumerate(zip(t.shape, o.shape)) if a != b]
            if (
                len(t.shape) != len(o.shape)
                or o.dtype != t.dtype
                or len(changed) != 1
                or t.shape[changed[0]] != 1000
                or o.shape[changed[0]] != n
            ):
                return None
            found[key] = changed[0]
        if rule is not None and found != rule:
            return None
        rule = found
    return rule or None


def main() -> None:
    warnings.simplefilter("ignore")  # googlenet/inception warn about their default initialisation
    models: dict[str, Any] = {}
    for name in sorted(torchvision.models.list_models(module=torchvision.models)):
        default = describe(name)
        rule = head_rule(name, default)
        entry = {
            "tensors": default["rows"],
            "auto_filled": default["auto_filled"],
            "ties": default["ties"],
            "num_classes": {"default": 1000, "head": rule} if rule else None,
        }
        # each entry is a JSON string of its own: a lookup parses the one model it needs
        models[name] = json.dumps(entry, sort_keys=True, separators=(",", ":"))
        print(f"{name}: {len(default['rows'])} keys, head {rule}", file=sys.stderr)
    table = {
        "schema": SCHEMA,
        "torchvision": torchvision.__version__.split("+")[0],
        "torch": torch.__version__,
        "models": models,
    }
    data = json.dumps(table, sort_keys=True, separators=(",", ":")).encode()
    with gzip.GzipFile(TABLE_PATH, "wb", compresslevel=9, mtime=0) as f:  # mtime 0: same input, same bytes
        f.write(data)
    print(f"{TABLE_PATH}: {len(models)} models, {os.path.getsize(TABLE_PATH)} bytes", file=sys.stderr)


if __name__ == "__main__":
    main()
