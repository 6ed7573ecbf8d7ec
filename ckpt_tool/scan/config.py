"""``[tool.ckpt]`` in the repository's pyproject.toml."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

from ..errors import UsageError


@dataclass(frozen=True)
class ProjectConfig:
    """The ``[tool.ckpt]`` table and where it was found (``path`` is empty when there is none)."""

    path: str = ""
    values: dict[str, Any] = field(default_factory=dict)

    @property
    def root(self) -> str:
        return os.path.dirname(self.path) if self.path else os.getcwd()


def find_pyproject(start: str | None = None) -> str | None:
    """The nearest ``pyproject.toml`` at ``start`` (default: the current directory) or above it."""
    here = os.path.abspath(start or os.getcwd())
    while True:
        candidate = os.path.join(here, "pyproject.toml")
        if os.path.isfile(candidate):
            return candidate
        parent = os.path.dirname(here)
        if parent == here:
            return None
        here = parent


def load_config(start: str | None = None) -> ProjectConfig:
    """Read ``[tool.ckpt]`` from the repository's ``pyproject.toml``; empty when there is none."""
    path = find_pyproject(start)
    if path is None:
        return ProjectConfig()
    try:
        with open(path, "rb") as f:
            if b"tool.ckpt" not in f.read():
                return ProjectConfig(path)  # most pyproject files have no [tool.ckpt]: skip the TOML parser
    except OSError as exc:
        raise UsageError(f"{path}: cannot be read ({exc.strerror or exc})") from None
    try:
        import tomllib
    except ImportError:  # Python 3.10
        import tomli as tomllib  # type: ignore[no-redef]
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise UsageError(f"{path}: cannot read [tool.ckpt] ({exc})") from None
    table = data.get("tool", {}).get("ckpt", {})
    if not isinstance(table, dict):
        raise UsageError(f"{path}: [tool.ckpt] must be a table")
    return ProjectConfig(path, table)


def config_allow(config: ProjectConfig) -> list[str]:
    """``[tool.ckpt] allow``, checked."""
    allow = config.values.get("allow", [])
    if not isinstance(allow, list) or not all(isinstance(a, str) for a in allow):
        raise UsageError(f"{config.path}: [tool.ckpt] allow must be a list of names")
    return allow


def path_matches(path: str, pattern: str, root: str) -> bool:
    """Whether ``path`` (relative to ``root``) matches a config glob such as ``models/cls_*.safetensors``."""
    import fnmatch

    rel = os.path.relpath(os.path.abspath(path), root).replace(os.sep, "/")
    return fnmatch.fnmatch(rel, pattern) or fnmatch.fnmatch(os.path.basename(path), pattern)
