"""Architectures written as a Python file at test time, for ``--arch FILE.py:factory`` and for the test itself."""

from __future__ import annotations

import importlib.util
import os
from types import ModuleType


def write_models(directory: str | os.PathLike[str], name: str, source: str) -> tuple[str, ModuleType]:
    """Write ``source`` to ``directory/name.py`` and import it: (the file's path, the module)."""
    path = os.path.join(directory, f"{name}.py")
    with open(path, "w", encoding="utf-8") as f:
        f.write(source)
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return path, module
