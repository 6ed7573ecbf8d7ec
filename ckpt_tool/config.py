"""The project's configuration: ``[tool.ckpt]`` in the repository's ``pyproject.toml``, found, read and checked.

This module owns the table and its schema; ``scan`` reads ``allow`` from it and ``validate`` every
key. All keys are optional::

    [tool.ckpt]
    allow = ["mypkg.models.Net"]        # extends scan's allow list
    require-format = "safetensors"      # or a list of format names
    max-size-mb = 200
    no-nan-inf = true                   # streams every floating tensor's values
    lfs-pointers = "pass"               # or "fail": an unfetched git-lfs pointer fails
    [tool.ckpt.arch]
    "models/cls_*.safetensors" = "resnet18"
    "models/det_*.pth" = { arch = "resnet50", args = { num_classes = 3 }, key = "state_dict" }

Globs are relative to the directory of the ``pyproject.toml``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

from .errors import UsageError
from .formats import sniff as fmt

KNOWN_KEYS = ("allow", "require-format", "max-size-mb", "no-nan-inf", "lfs-pointers", "arch")
# the formats ``require-format`` may name
FORMATS = (fmt.ZIP, fmt.TORCHSCRIPT, fmt.LEGACY, fmt.SAFETENSORS, fmt.PICKLE)

# one ``[tool.ckpt.arch]`` entry: (glob, architecture spec, its arguments, the nested state-dict key)
ArchRule = tuple[str, str, dict[str, Any], str | None]


@dataclass(frozen=True)
class ProjectConfig:
    """The ``[tool.ckpt]`` table and where it was found (``path`` is empty when there is none)."""

    path: str = ""
    values: dict[str, Any] = field(default_factory=dict)

    @property
    def root(self) -> str:
        return os.path.dirname(self.path) if self.path else os.getcwd()


@dataclass(frozen=True)
class ProjectPolicies:
    """``[tool.ckpt]`` checked and normalised: what validate holds each file to (``allow`` is scan's)."""

    formats: tuple[str, ...] = ()
    max_bytes: int | None = None
    no_nan_inf: bool = False
    lfs_fails: bool = False
    arch: tuple[ArchRule, ...] = ()
    root: str = ""  # what the arch globs are relative to


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
    """``[tool.ckpt] allow``, checked (scan reads this key alone and leaves the others to validate)."""
    allow = config.values.get("allow", [])
    if not isinstance(allow, list) or not all(isinstance(a, str) for a in allow):
        raise UsageError(f"{config.path}: [tool.ckpt] allow must be a list of names")
    return allow


def project_policies(config: ProjectConfig) -> ProjectPolicies:
    """Check every ``[tool.ckpt]`` key; a bad or unknown entry is a usage error naming it."""
    values = config.values
    where = config.path or "[tool.ckpt]"
    unknown = sorted(set(values) - set(KNOWN_KEYS))
    if unknown:
        raise UsageError(
            f"{where}: unknown [tool.ckpt] keys {', '.join(unknown)} (known: {', '.join(sorted(KNOWN_KEYS))})"
        )
    formats = values.get("require-format", [])
    formats = [formats] if isinstance(formats, str) else formats
    if not isinstance(formats, list) or any(f not in FORMATS for f in formats):
        raise UsageError(
            f"{where}: require-format {values.get('require-format')!r}: use one or more of {', '.join(FORMATS)}"
        )
    size = values.get("max-size-mb")
    if size is not None and (isinstance(size, bool) or not isinstance(size, (int, float)) or size <= 0):
        raise UsageError(f"{where}: max-size-mb must be a positive number")
    nan = values.get("no-nan-inf", False)
    lfs = values.get("lfs-pointers", "pass")
    if not isinstance(nan, bool):
        raise UsageError(f"{where}: no-nan-inf must be true or false")
    if lfs not in ("pass", "fail"):
        raise UsageError(f'{where}: lfs-pointers must be "pass" or "fail"')
    config_allow(config)  # checked here too: a bad entry fails validate however the policy is built
    return ProjectPolicies(
        formats=tuple(formats),
        max_bytes=int(size * 1024 * 1024) if size is not None else None,
        no_nan_inf=nan,
        lfs_fails=lfs == "fail",
        arch=_arch_rules(values.get("arch", {}), where),
        root=config.root,
    )


def _arch_rules(table: Any, where: str) -> tuple[ArchRule, ...]:
    if not isinstance(table, dict):
        raise UsageError(f"{where}: [tool.ckpt.arch] must map globs to architectures")
    out: list[ArchRule] = []
    for pattern, entry in table.items():
        if isinstance(entry, str):
            out.append((pattern, entry, {}, None))
        elif (
            isinstance(entry, dict)
            and isinstance(entry.get("arch"), str)
            and isinstance(entry.get("args", {}), dict)
            and isinstance(entry.get("key", ""), str)
            and not set(entry) - {"arch", "args", "key"}
        ):
            out.append((pattern, entry["arch"], dict(entry.get("args", {})), entry.get("key")))
        else:
            raise UsageError(
                f'{where}: [tool.ckpt.arch] {pattern!r} must be "ARCH" or {{ arch = ..., args = {{...}}, key = ... }}'
            )
    return tuple(out)


def path_matches(path: str, pattern: str, root: str) -> bool:
    """Whether ``path`` (relative to ``root``) matches a config glob such as ``models/cls_*.safetensors``."""
    import fnmatch

    rel = os.path.relpath(os.path.abspath(path), root).replace(os.sep, "/")
    return fnmatch.fnmatch(rel, pattern) or fnmatch.fnmatch(os.path.basename(path), pattern)
