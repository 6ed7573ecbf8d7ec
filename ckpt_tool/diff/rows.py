"""The table of a diff: one row per key or per module (``--depth``), runs of numbered layers folded."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import replace
from typing import Any

from ..checkpoint import numel
from .report import AUTO, MATCHED, MIXED, TIED, KeyDiff, Row


def rows_of(keys: list[KeyDiff], depth: int | None, show_all: bool) -> tuple[list[Row], int]:
    if depth:
        rows = _module_rows(keys, depth)
        shown = [r for r in rows if show_all or not _is_quiet(r)]
        return fold_rows(shown), len(rows) - len(shown)
    # a row per key: the hidden ones are not built (a diff of two copies of a model hides every key)
    shown = [_key_row(k) for k in keys if show_all or not _is_quiet(k)]
    return fold_leaves(fold_rows(shown)), len(keys) - len(shown)


def _is_quiet(row: Row | KeyDiff) -> bool:
    """Matched rows (with --values: matched and unchanged) are hidden unless --all."""
    if row.status in (AUTO, TIED):
        return True
    if row.status != MATCHED:
        return False
    return row.max_abs_diff is None or row.max_abs_diff == 0


def _key_row(k: KeyDiff) -> Row:
    return Row(
        k.key,
        k.status,
        1,
        k.source_shape,
        k.source_dtype,
        k.target_shape,
        k.target_dtype,
        numel(k.source_shape) if k.source_shape is not None else 0,
        numel(k.target_shape) if k.target_shape is not None else 0,
        max_abs_diff=k.max_abs_diff,
        rel_change=k.rel_change,
    )


def _module_rows(keys: list[KeyDiff], depth: int) -> list[Row]:
    groups: dict[str, list[KeyDiff]] = {}
    for k in keys:
        module = k.key.rpartition(".")[0]
        groups.setdefault(".".join(module.split(".")[:depth]) if module else "(top level)", []).append(k)
    rows = []
    for name, members in groups.items():
        statuses: dict[str, int] = {}
        for k in members:
            statuses[k.status] = statuses.get(k.status, 0) + 1
        changed = [k.max_abs_diff for k in members if k.max_abs_diff is not None]
        rows.append(
            Row(
                name,
                next(iter(statuses)) if len(statuses) == 1 else MIXED,
                len(members),
                source_numel=sum(numel(k.source_shape) for k in members if k.source_shape is not None),
                target_numel=sum(numel(k.target_shape) for k in members if k.target_shape is not None),
                statuses=statuses,
                max_abs_diff=max(changed) if changed else None,
            )
        )
    return rows


def fold_rows(rows: list[Row]) -> list[Row]:
    """Fold rows that differ only in numeric key components: ``layer1.{0..1}.conv1.weight``, ``features.{0,2,5}.weight``.

    Rows fold only when everything else (status, shapes, dtypes, counts) is equal; rows with compared
    values never fold (each has its own figures).
    """
    groups: dict[tuple[Any, ...], list[tuple[int, tuple[int, ...]]]] = {}
    for i, row in enumerate(rows):
        parts = row.name.split(".")
        numbers = tuple(int(p) for p in parts if is_index(p))
        if not numbers or row.max_abs_diff is not None:
            groups[("row", i)] = [(i, ())]
            continue
        template = tuple("#" if is_index(p) else p for p in parts)
        groups.setdefault((template, _fold_signature(row), row.source_numel, row.target_numel), []).append((i, numbers))
    out: list[tuple[int, Row]] = []
    for members in groups.values():
        first = rows[members[0][0]]
        if len(members) == 1:
            out.append((members[0][0], first))
            continue
        width = len(members[0][1])
        # fold along the numeric position that leaves the fewest rows
        position = min(range(width), key=lambda p: len({n[:p] + n[p + 1 :] for _, n in members}))
        runs: dict[tuple[int, ...], list[tuple[int, tuple[int, ...]]]] = {}
        for i, n in members:
            runs.setdefault(n[:position] + n[position + 1 :], []).append((i, n))
        for run in runs.values():
            head = rows[run[0][0]]
            if len(run) == 1:
                out.append((run[0][0], head))
                continue
            name = _fold_name(head.name, position, [n[position] for _, n in run])
            out.append(
                (
                    run[0][0],
                    replace(
                        head,
                        name=name,
                        keys=sum(rows[i].keys for i, _ in run),
                        source_numel=sum(rows[i].source_numel for i, _ in run),
                        target_numel=sum(rows[i].target_numel for i, _ in run),
                        statuses=_sum_statuses(rows[i] for i, _ in run),
                    ),
                )
            )
    return [row for _, row in sorted(out, key=lambda item: item[0])]


def fold_leaves(rows: list[Row]) -> list[Row]:
    """Fold rows of one module that differ only in the last name: ``bn1.{weight,bias,running_mean}``."""
    groups: dict[tuple[Any, ...], list[int]] = {}
    for i, row in enumerate(rows):
        parent = row.name.rpartition(".")[0]
        if not parent or row.max_abs_diff is not None:
            groups[("row", i)] = [i]
        else:
            groups.setdefault((parent, _fold_signature(row)), []).append(i)
    out: list[tuple[int, Row]] = []
    for members in groups.values():
        head = rows[members[0]]
        if len(members) == 1:
            out.append((members[0], head))
            continue
        leaves = ",".join(rows[i].name.rpartition(".")[2] for i in members)
        out.append(
            (
                members[0],
                replace(
                    head,
                    name=f"{head.name.rpartition('.')[0]}.{{{leaves}}}",
                    keys=sum(rows[i].keys for i in members),
                    source_numel=sum(rows[i].source_numel for i in members),
                    target_numel=sum(rows[i].target_numel for i in members),
                ),
            )
        )
    return [row for _, row in sorted(out, key=lambda item: item[0])]


def _fold_signature(row: Row) -> tuple[Any, ...]:
    return (
        row.status,
        row.source_shape,
        row.source_dtype,
        row.target_shape,
        row.target_dtype,
        tuple(sorted(row.statuses.items())),
    )


def is_index(part: str) -> bool:
    return part.isdigit() and (part == "0" or not part.startswith("0"))


def _sum_statuses(rows: Iterable[Row]) -> dict[str, int]:
    total: dict[str, int] = {}
    for row in rows:
        for status, n in row.statuses.items():
            total[status] = total.get(status, 0) + n
    return total


def _fold_name(name: str, position: int, numbers: list[int]) -> str:
    parts = name.split(".")
    index_positions = [j for j, p in enumerate(parts) if is_index(p)]
    parts[index_positions[position]] = "{" + format_indices(numbers) + "}"
    return ".".join(parts)


def format_indices(numbers: Iterable[int]) -> str:
    """``[0, 1, 2, 5, 7, 8]`` -> ``"0..2,5,7..8"``."""
    values = sorted(set(numbers))
    spans: list[str] = []
    start = prev = values[0]
    for v in [*values[1:], None]:
        if v is not None and v == prev + 1:
            prev = v
            continue
        spans.append(str(start) if start == prev else f"{start}..{prev}")
        if v is not None:
            start = prev = v
    return ",".join(spans)
