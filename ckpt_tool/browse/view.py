"""What ``ckpt browse`` shows, as plain data: the file's summary, a module tree built lazily, tensor rows.

Nothing here imports Textual, so the browser's logic is tested without a terminal. The tree is
lazy because a checkpoint may hold 100,000 tensors: opening groups the keys under the root's
children only (one pass), and a module's children are grouped the first time it is expanded.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from ..checkpoint import Candidate, Checkpoint, TensorRef, itemsize, numel
from ..diff import AUTO, DTYPE, MATCHED, MISSING, SHAPE, UNEXPECTED, DiffReport, diff
from ..errors import UsageError
from ..formats.dcp import FORMAT as DCP
from ..formats.dcp import METADATA
from ..reader import open_checkpoint

# worst first: a module takes the status of its worst key
STATUS_ORDER = (MISSING, SHAPE, UNEXPECTED, DTYPE, MATCHED, AUTO)
EQUAL = (MATCHED, AUTO)
SORTS = ("file", "name", "size", "params")
# rows the tensor table holds at most; a filter narrows a larger module
MAX_ROWS = 500


@dataclass(frozen=True)
class Summary:
    """The file as ``ckpt inspect`` describes it, for the header and the summary screen."""

    path: str
    format: str
    file_size: int
    files: tuple[str, ...]
    state_path: str | None
    candidates: tuple[Candidate, ...]
    tensors: int
    parameters: int
    tensor_bytes: int
    extras: dict[str, Any]
    metadata: dict[str, str]
    placeholders: tuple[str, ...]

    @property
    def state_dict(self) -> str:
        if self.state_path is None:
            return "(none found)"
        return "<top level>" if self.state_path == "" else repr(self.state_path)


@dataclass(frozen=True)
class Entry:
    """One key of the browsed state dict or, in diff mode, of the target only (``ref`` is then ``None``)."""

    key: str
    shape: tuple[int, ...]
    dtype: str
    ref: TensorRef | None
    shared_with: tuple[str, ...] = ()
    status: str | None = None
    target_shape: tuple[int, ...] | None = None
    target_dtype: str | None = None

    @property
    def numel(self) -> int:
        return numel(self.shape)

    @property
    def nbytes(self) -> int:
        return self.numel * itemsize(self.dtype)


@dataclass(frozen=True)
class Module:
    """A node of the module tree: ``path`` is ``""`` for the root; figures count every key under it."""

    path: str
    name: str
    tensors: int
    parameters: int
    nbytes: int
    has_children: bool
    statuses: tuple[tuple[str, int], ...] = ()

    @property
    def status(self) -> str | None:
        """The worst diff status among the module's keys (``None`` outside diff mode)."""
        present = dict(self.statuses)
        return next((s for s in STATUS_ORDER if present.get(s)), None)

    @property
    def differences(self) -> int:
        return sum(n for s, n in self.statuses if s not in EQUAL)


@dataclass(frozen=True)
class BrowseData:
    """Everything the browser shows, read header-only: no tensor bytes, no torch (unless ``--arch`` builds one)."""

    summary: Summary
    checkpoint: Checkpoint
    report: DiffReport | None = None
    target_files: tuple[str, ...] = ()

    @property
    def files(self) -> tuple[str, ...]:
        """The files the safety verdict covers: the checkpoint's (shards included) and a target checkpoint's."""
        return tuple(dict.fromkeys(self.summary.files + self.target_files))


def load(
    path: str,
    target: str | None = None,
    *,
    arch: str | None = None,
    arch_args: Sequence[str] = (),
    key: str | None = None,
    target_key: str | None = None,
    use_cache: bool = True,
) -> BrowseData:
    """Open a checkpoint for browsing and, with ``target`` or ``arch``, diff it with the diff engine.

    Example:
        >>> data = load("tiny_cnn_10.pth", "tiny_cnn_2.pth")  # a 10-class head against a 2-class one
        >>> data.summary.tensors, data.report.counts.shape_mismatches
        (18, 2)
    """
    from ..arch import parse_arch_args, target_signature

    if target is not None and arch is not None:
        raise UsageError("give a second checkpoint or --arch, not both")
    if arch_args and arch is None:
        raise UsageError("--arch-arg needs --arch")
    if target_key is not None and target is None:
        raise UsageError("--target-key needs a second checkpoint")
    ckpt = open_checkpoint(path, key)
    summary = Summary(
        path=ckpt.path,
        format=ckpt.format,
        file_size=ckpt.file_size,
        files=_scanned_files(ckpt),
        state_path=ckpt.state_path,
        candidates=ckpt.candidates,
        tensors=len(ckpt.tensors),
        parameters=ckpt.parameters,
        tensor_bytes=ckpt.tensor_bytes,
        extras=ckpt.extras,
        metadata=ckpt.metadata,
        placeholders=ckpt.placeholders,
    )
    if target is None and arch is None:
        return BrowseData(summary, ckpt)
    if arch is not None:
        report = diff(ckpt, target_signature(arch, parse_arch_args(list(arch_args)), use_cache=use_cache))
        return BrowseData(summary, ckpt, report)
    other = open_checkpoint(target, target_key)  # type: ignore[arg-type]
    return BrowseData(summary, ckpt, diff(ckpt, other), other.files or (other.path,))


def _scanned_files(ckpt: Checkpoint) -> tuple[str, ...]:
    """The files the safety verdict scans: a DCP directory's pickled .metadata beside its shards."""
    if ckpt.format == DCP:
        return (os.path.join(ckpt.path, METADATA), *ckpt.files)
    return ckpt.files or (ckpt.path,)


class ModuleTree:
    """The module tree over a selection of keys, grouped lazily, with the rows of any module.

    Keys split on ``.``: ``features.0.weight`` is the tensor ``weight`` of the module ``features.0``.
    ``selection`` holds the indices (into :attr:`keys`) of the keys shown: all of them, those a filter
    matches, or only the differences.
    """

    def __init__(self, data: BrowseData, selection: Iterable[int] | None = None, sort: str = "file") -> None:
        if sort not in SORTS:
            raise UsageError(f"sort {sort!r}: choose one of {', '.join(SORTS)}")
        self.data = data
        self.sort = sort
        tensors = data.checkpoint.tensors
        report = data.report
        if report is None:
            self.keys = list(tensors)
            self.statuses: list[str | None] = [None] * len(self.keys)
            self._target: dict[str, tuple[tuple[int, ...] | None, str | None]] = {}
        else:
            # source keys in file order, then the keys only the target has (what `missing` means)
            by_key = {k.key: k for k in report.keys}
            self.keys = list(tensors) + [k.key for k in report.keys if k.key not in tensors]
            self.statuses = [by_key[k].status if k in by_key else None for k in self.keys]
            self._target = {k.key: (k.target_shape, k.target_dtype) for k in report.keys}
        self.numel: list[int] = []
        self.nbytes: list[int] = []
        for k in self.keys:
            ref = tensors.get(k)
            shape, dtype = (ref.shape, ref.dtype) if ref is not None else self._target_side(k)
            n = numel(shape)
            self.numel.append(n)
            self.nbytes.append(n * itemsize(dtype))
        self.selection = list(range(len(self.keys))) if selection is None else list(selection)
        self._members: dict[str, list[int]] = {"": self.selection}
        self._depth: dict[str, int] = {"": 0}
        self._children: dict[str, list[Module]] = {}
        self._shared: dict[str, list[str]] | None = None
        self._root: Module | None = None

    def with_selection(self, selection: Iterable[int]) -> ModuleTree:
        tree = ModuleTree.__new__(ModuleTree)
        tree.__dict__.update(self.__dict__)
        tree.selection = list(selection)
        tree._members, tree._depth, tree._children, tree._root = {"": tree.selection}, {"": 0}, {}, None
        return tree

    def with_sort(self, sort: str) -> ModuleTree:
        tree = self.with_selection(self.selection)
        if sort not in SORTS:
            raise UsageError(f"sort {sort!r}: choose one of {', '.join(SORTS)}")
        tree.sort = sort
        return tree

    # --- the tree ------------------------------------------------------------------------------------

    def root(self) -> Module:
        if self._root is None:
            self._root = self._make_root()
        return self._root

    def _make_root(self) -> Module:
        members = self.selection
        return Module(
            "",
            "",
            len(members),
            sum(self.numel[i] for i in members),
            sum(self.nbytes[i] for i in members),
            bool(self.children("")),
            self._statuses(members),
        )

    def children(self, path: str) -> list[Module]:
        """The child modules of ``path``, grouped on first call (cost: the keys under ``path``)."""
        if path not in self._children:
            if path not in self._members:
                # a path never opened: group its ancestors first
                parts = path.split(".")
                for i in range(len(parts)):
                    self.children(".".join(parts[:i]))
                if path not in self._members:
                    return []
            self._children[path] = self._sorted_modules(self._group(path))
        return self._children[path]

    def _group(self, path: str) -> list[Module]:
        depth = self._depth[path]
        groups: dict[str, list[int]] = {}
        nested: set[str] = set()
        for i in self._members[path]:
            # split no further than this level needs: the child's name, and whether it has children itself
            parts = self.keys[i].split(".", depth + 2)
            if len(parts) > depth + 1:
                name = parts[depth]
                groups.setdefault(name, []).append(i)
                if len(parts) > depth + 2:
                    nested.add(name)
        out = []
        for name, members in groups.items():
            child = f"{path}.{name}" if depth else name
            self._members[child] = members
            self._depth[child] = depth + 1
            out.append(
                Module(
                    child,
                    name,
                    len(members),
                    sum(self.numel[i] for i in members),
                    sum(self.nbytes[i] for i in members),
                    name in nested,
                    self._statuses(members),
                )
            )
        return out

    def _statuses(self, members: list[int]) -> tuple[tuple[str, int], ...]:
        if self.data.report is None:
            return ()
        counts: dict[str, int] = {}
        for i in members:
            s = self.statuses[i]
            if s is not None:
                counts[s] = counts.get(s, 0) + 1
        return tuple(sorted(counts.items(), key=lambda kv: STATUS_ORDER.index(kv[0])))

    def _sorted_modules(self, modules: list[Module]) -> list[Module]:
        if self.sort == "name":
            return sorted(modules, key=lambda m: natural_key(m.name))
        if self.sort == "size":
            return sorted(modules, key=lambda m: -m.nbytes)
        if self.sort == "params":
            return sorted(modules, key=lambda m: -m.parameters)
        return modules

    # --- the table -----------------------------------------------------------------------------------

    def rows(self, path: str, limit: int = MAX_ROWS) -> tuple[list[Entry], int]:
        """The first ``limit`` keys under ``path`` in the tree's sort order, and how many there are in all."""
        members = self._members.get(path)
        if members is None:
            members = [i for i in self.selection if _under(self.keys[i], path)]
        if self.sort == "name":
            members = sorted(members, key=lambda i: natural_key(self.keys[i]))
        elif self.sort == "size":
            members = sorted(members, key=lambda i: -self.nbytes[i])
        elif self.sort == "params":
            members = sorted(members, key=lambda i: -self.numel[i])
        return [self.entry(i) for i in members[:limit]], len(members)

    def entry(self, i: int) -> Entry:
        key = self.keys[i]
        ref = self.data.checkpoint.tensors.get(key)
        target_shape, target_dtype = self._target.get(key, (None, None))
        if ref is None:
            shape, dtype = self._target_side(key)
            return Entry(key, shape, dtype, None, (), self.statuses[i], target_shape, target_dtype)
        shared = tuple(k for k in self._shared_storages().get(ref.storage, ()) if k != key)
        return Entry(key, ref.shape, ref.dtype, ref, shared, self.statuses[i], target_shape, target_dtype)

    def _target_side(self, key: str) -> tuple[tuple[int, ...], str]:
        shape, dtype = self._target.get(key, (None, None))
        return shape or (), dtype or "float32"

    def _shared_storages(self) -> dict[str, list[str]]:
        if self._shared is None:
            self._shared = self.data.checkpoint.shared_storages()
        return self._shared

    # --- selections ----------------------------------------------------------------------------------

    def select(self, pattern: str = "", differences_only: bool = False) -> list[int]:
        """Indices of the keys a filter (a regular expression, or literal text if it is not one) keeps."""
        rx = compile_filter(pattern) if pattern else None
        out = []
        for i, key in enumerate(self.keys):
            if differences_only and self.statuses[i] in EQUAL:
                continue
            if rx is not None and not rx.search(key):
                continue
            out.append(i)
        return out


def compile_filter(text: str) -> re.Pattern[str]:
    """``text`` as a regular expression; text that is not a valid one matches literally (``layer[1`` finds itself)."""
    try:
        return re.compile(text)
    except re.error:
        return re.compile(re.escape(text))


def natural_key(name: str) -> tuple[tuple[int, int | str], ...]:
    """Sort key that puts ``layers.2`` before ``layers.10``."""
    return tuple((0, int(p)) if p.isdigit() else (1, p) for p in name.split("."))


def _under(key: str, path: str) -> bool:
    return path == "" or key.startswith(path + ".")
