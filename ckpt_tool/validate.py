"""``validate``: the pre-commit gate. scan + loadability + the project's ``[tool.ckpt]`` policies.

The policies, all optional, and their schema are :mod:`ckpt_tool.config`'s. torch is imported only
for an arch check, and only when the signature is not cached.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from .bulk import paused
from .checkpoint import Checkpoint, is_floating
from .config import ProjectConfig, ProjectPolicies, load_config, path_matches, project_policies
from .errors import CkptError, TorchMissingError
from .formats import sniff as fmt
from .formats.safetensors import headers_memoized
from .scan import SAFE, FileScan, Policy, iter_model_files, policy_for, scan_file
from .text import some

PASS, FAIL, NOTE = "pass", "fail", "note"
_SHOWN = 5  # keys named in a failed check's message


@dataclass(frozen=True)
class FileCheck:
    """One check on one file: ``pass``, ``fail`` or ``note`` (a pass worth saying, like an lfs pointer)."""

    name: str
    status: str
    message: str


@dataclass(frozen=True)
class FileValidation:
    path: str
    format: str
    checks: tuple[FileCheck, ...]
    scan: FileScan | None = None

    @property
    def ok(self) -> bool:
        return all(c.status != FAIL for c in self.checks)

    def to_json(self) -> dict[str, Any]:
        return {"path": self.path, "format": self.format, "ok": self.ok, "checks": list(self.checks), "scan": self.scan}


@dataclass(frozen=True)
class ValidateReport:
    files: tuple[FileValidation, ...]
    config: str

    @property
    def ok(self) -> bool:
        return all(f.ok for f in self.files)

    def to_json(self) -> dict[str, Any]:
        return {"ok": self.ok, "config": self.config or None, "files": list(self.files)}


@dataclass(frozen=True)
class Rules:
    """What each file is held to: scan's policy (with ``[tool.ckpt] allow``) and the project's policies."""

    policy: Policy
    project: ProjectPolicies = ProjectPolicies()


def rules_from_config(config: ProjectConfig, allow: Iterable[str] = ()) -> Rules:
    """Check ``[tool.ckpt]`` and turn it into :class:`Rules`; a bad entry is a usage error naming it."""
    project = project_policies(config)
    return Rules(policy_for(config, allow), project)


def validate(paths: Iterable[str], allow: Iterable[str] = (), config_dir: str | None = None) -> ValidateReport:
    """Validate model files (directories recursively; a sharded set by its ``*.index.json``).

    Example:
        >>> validate(["models/tiny_cnn.safetensors"]).ok
        True
    """
    config = load_config(config_dir)
    rules = rules_from_config(config, allow)
    with headers_memoized():  # a shard's header is asked for by the walk, the scan, the load and its index
        files = tuple(validate_file(p, rules) for p in iter_model_files(list(paths), indexes=True))
    return ValidateReport(files, config.path)


@paused
def validate_file(path: str, rules: Rules) -> FileValidation:
    """Every check that applies to one file or one sharded index."""
    if path.endswith(".index.json"):
        return _validate_sharded(path, rules)
    kind = fmt.sniff(path)
    if kind == fmt.LFS_POINTER:
        result = scan_file(path, rules.policy)
        status = FAIL if rules.project.lfs_fails else NOTE
        return FileValidation(path, kind, (FileCheck("lfs", status, result.notes[0]),), result)
    result = scan_file(path, rules.policy)
    checks = [_scan_check(result)]
    if kind == fmt.DCP_SHARD:  # loaded with its directory, on the row of its .metadata
        return FileValidation(
            path,
            result.format,
            (
                *checks,
                FileCheck("loads", NOTE, "one shard of a DCP directory: loaded with the directory (see its .metadata)"),
            ),
            result,
        )
    loaded = path
    if os.path.basename(path) == ".metadata" and fmt.sniff(os.path.dirname(path) or ".") == fmt.DCP:
        loaded = os.path.dirname(path) or "."  # a DCP directory's .metadata: the directory is what loads
        result = dataclasses.replace(result, format=fmt.DCP)
    ckpt, loads = _opens_check(loaded)
    checks.append(loads)
    checks.extend(_policy_checks(path, result.format, os.path.getsize(path), ckpt, rules))
    return FileValidation(path, result.format, tuple(checks), result)


def _scan_check(result: FileScan) -> FileCheck:
    if result.verdict == SAFE:
        return FileCheck(
            "scan",
            PASS,
            "safe: " + (", ".join(result.notes) if result.notes else f"{len(result.globals)} globals, all allowed"),
        )
    by_reason: dict[str, list[str]] = {}
    for f in result.findings:
        if f.severity == result.verdict and f.name not in by_reason.setdefault(f.reason, []):
            by_reason[f.reason].append(f.name)
    parts = [
        ", ".join(names[:3]) + (f" +{len(names) - 3} more" if len(names) > 3 else "") + f": {reason}"
        for reason, names in by_reason.items()
    ]
    return FileCheck("scan", FAIL, f"{result.verdict}: " + "; ".join(parts))


def _opens_check(path: str, key: str | None = None) -> tuple[Checkpoint | None, FileCheck]:
    from .reader import open_checkpoint

    try:
        ckpt = open_checkpoint(path, key)
    except CkptError as exc:
        return None, FileCheck("loads", FAIL, str(exc))
    if not ckpt.tensors:
        return ckpt, FileCheck("loads", NOTE, "opens with the safe reader, but holds no tensors")
    return ckpt, FileCheck("loads", PASS, f"{len(ckpt.tensors)} tensors described consistently")


def _policy_checks(path: str, kind: str, size: int, ckpt: Checkpoint | None, rules: Rules) -> list[FileCheck]:
    checks: list[FileCheck] = []
    project = rules.project
    if project.formats:
        inner = kind.partition("(")[2].rstrip(")") if kind.startswith(fmt.SHARDED) else kind
        ok = inner in project.formats
        checks.append(
            FileCheck(
                "format",
                PASS if ok else FAIL,
                f"{kind}" + ("" if ok else f", the project requires {' or '.join(project.formats)}"),
            )
        )
    if project.max_bytes is not None:
        ok = size <= project.max_bytes
        checks.append(
            FileCheck(
                "size",
                PASS if ok else FAIL,
                f"{size / 2**20:.1f} MB {'within' if ok else 'over'} the {project.max_bytes / 2**20:g} MB limit",
            )
        )
    if project.no_nan_inf and ckpt is not None and ckpt.tensors:
        checks.append(_values_check(ckpt))
    for pattern, spec, args, key in project.arch:
        if path_matches(path, pattern, project.root):
            checks.append(_arch_check(path, ckpt, spec, args, key))
    return checks


def _values_check(ckpt: Checkpoint) -> FileCheck:
    from .values import FileCache, has_bytes, tensor_stats

    bad: list[str] = []
    checked = 0
    with FileCache() as files:
        for ref in ckpt.tensors.values():
            if not is_floating(ref.dtype) or not has_bytes(ref):
                continue
            try:
                stats = tensor_stats(ref, files)
            except CkptError as exc:
                return FileCheck("values", FAIL, str(exc))
            checked += 1
            if stats.nan or stats.inf:
                bad.append(f"{ref.key} ({stats.nan} NaN, {stats.inf} Inf)")
    if bad:
        return FileCheck("values", FAIL, f"{len(bad)} tensors hold NaN or Inf: {some(bad, _SHOWN)}")
    return FileCheck("values", PASS, f"{checked} floating tensors, no NaN or Inf")


def _arch_check(path: str, ckpt: Checkpoint | None, spec: str, args: dict[str, Any], key: str | None) -> FileCheck:
    """Would ``load_state_dict(strict=True)`` accept it? The one engine (:mod:`ckpt_tool.compat`)."""
    from .arch import target_signature
    from .compat import check_checkpoint

    label = spec + (f" {args}" if args else "")
    try:
        if key is not None or ckpt is None:
            ckpt, loads = _opens_check(path, key)
            if ckpt is None:
                return FileCheck("arch", FAIL, f"{label}: {loads.message}")
        signature = target_signature(spec, args)
        result = check_checkpoint(ckpt, signature)
    except TorchMissingError:
        raise  # not a finding about the file: the command cannot run here (exit 2)
    except CkptError as exc:
        return FileCheck("arch", FAIL, f"{label}: {exc}")
    if result.loads:
        return FileCheck("arch", PASS, f"{label}: all {len(signature.tensors)} keys match")
    wrong = [*result.missing, *result.unexpected, *(m.key for m in result.mismatched)][:_SHOWN]
    return FileCheck(
        "arch",
        FAIL,
        f"{label}: {len(result.missing)} missing, {len(result.unexpected)} unexpected, "
        f"{len(result.mismatched)} shape mismatches (e.g. {', '.join(wrong)}); see `ckpt diff {path} --arch {spec}`",
    )


def _validate_sharded(path: str, rules: Rules) -> FileValidation:
    """A sharded set as a whole: shards exist and stay inside the directory, each key in one shard, total_size."""
    from .reader import shard_location

    index_path = path
    doubled: list[str] = []

    def pairs(items: list[tuple[str, Any]]) -> dict[str, Any]:
        # json keeps the last of two equal keys silently; a key listed twice is a key in two shards
        seen: dict[str, Any] = {}
        for k, v in items:
            if k in seen and isinstance(v, str):
                doubled.append(f"{k} ({seen[k]} and {v})")
            seen[k] = v
        return seen

    try:
        with open(index_path, encoding="utf-8") as f:
            index = json.load(f, object_pairs_hook=pairs)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        return FileValidation(path, fmt.SHARDED, (FileCheck("index", FAIL, f"unreadable index ({exc})"),))
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        return FileValidation(
            index_path, fmt.SHARDED, (FileCheck("index", FAIL, "no weight_map of key -> shard file"),)
        )
    base = os.path.dirname(os.path.abspath(index_path))
    checks: list[FileCheck] = []
    if doubled:
        checks.append(
            FileCheck(
                "keys", FAIL, f"{len(doubled)} keys are listed twice in the index: " + ", ".join(doubled[:_SHOWN])
            )
        )
    shards: dict[str, Checkpoint] = {}
    for shard in dict.fromkeys(weight_map.values()):
        try:
            shard_path = shard_location(base, shard, index_path)
        except CkptError as exc:
            checks.append(FileCheck("shards", FAIL, str(exc)))
            continue
        if not os.path.isfile(shard_path):
            checks.append(FileCheck("shards", FAIL, f"shard {shard!r} named in the index does not exist"))
        else:
            scanned = _scan_check(scan_file(shard_path, rules.policy))
            if scanned.status == FAIL:
                checks.append(FileCheck("scan", FAIL, f"{shard}: {scanned.message}"))
            ckpt, loads = _opens_check(shard_path)
            if ckpt is None:
                checks.append(FileCheck("loads", FAIL, loads.message))
            else:
                shards[shard] = ckpt
    checks.extend(_key_checks(weight_map, shards))
    nbytes = sum(t.nbytes for s in shards.values() for t in s.tensors.values())
    total = (index.get("metadata") or {}).get("total_size") if isinstance(index.get("metadata"), dict) else None
    if total is not None and len(shards) == len(set(weight_map.values())):
        ok = total == nbytes
        checks.append(
            FileCheck(
                "total_size",
                PASS if ok else FAIL,
                f"index says {total} bytes" + ("" if ok else f", the shards' tensors hold {nbytes}"),
            )
        )
    if not any(c.status == FAIL for c in checks):
        checks.insert(0, FileCheck("shards", PASS, f"{len(shards)} shards, {len(weight_map)} keys, all scanned safe"))
    first = next(iter(shards.values()), None)
    kind = f"{fmt.SHARDED} ({first.format if first else 'empty'})"
    size = sum(s.file_size for s in shards.values())
    ckpt = None
    if rules.project.no_nan_inf and shards and not any(c.status == FAIL for c in checks):
        from .reader import open_checkpoint

        ckpt = open_checkpoint(index_path)
    checks.extend(_policy_checks(index_path, kind, size, ckpt, rules))
    return FileValidation(index_path, kind, tuple(checks))


def _key_checks(weight_map: dict[str, str], shards: dict[str, Checkpoint]) -> list[FileCheck]:
    checks = []
    holders: dict[str, list[str]] = {}
    for shard, ckpt in shards.items():
        for key in ckpt.tensors:
            holders.setdefault(key, []).append(shard)
    doubled = sorted(k for k, where in holders.items() if len(where) > 1)
    if doubled:
        checks.append(
            FileCheck(
                "keys",
                FAIL,
                f"{len(doubled)} keys are in two shards: "
                + ", ".join(f"{k} ({' and '.join(holders[k])})" for k in doubled[:_SHOWN]),
            )
        )
    absent = sorted(k for k, shard in weight_map.items() if shard in shards and k not in shards[shard].tensors)
    if absent:
        checks.append(
            FileCheck(
                "keys",
                FAIL,
                f"{len(absent)} keys the index places in a shard that lacks them: "
                + ", ".join(f"{k} ({weight_map[k]})" for k in absent[:_SHOWN]),
            )
        )
    unindexed = sorted(k for k in holders if k not in weight_map)
    if unindexed:
        checks.append(
            FileCheck(
                "keys",
                FAIL,
                f"{len(unindexed)} keys in the shards are missing from the index: " + ", ".join(unindexed[:_SHOWN]),
            )
        )
    return checks
