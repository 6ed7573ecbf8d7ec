"""Plain-text helpers for the messages library code builds (errors, check details); no output, no click."""

from __future__ import annotations

from collections.abc import Iterable


def some(items: Iterable[str], limit: int = 3) -> str:
    """The first ``limit`` items, then how many more: ``"a, b, c and 4 more"``."""
    items = list(items)
    return ", ".join(items[:limit]) + (f" and {len(items) - limit} more" if len(items) > limit else "")


def grouped_notes(pairs: Iterable[tuple[str, str]]) -> list[str]:
    """``(key, note)`` pairs as one line per distinct note: ``"3 tensors: <note> (a, b, c)"`` or ``"a: <note>"``."""
    by_note: dict[str, list[str]] = {}
    for key, note in pairs:
        by_note.setdefault(note, []).append(key)
    return [
        f"{len(keys)} tensors: {note} ({some(keys)})" if len(keys) > 1 else f"{keys[0]}: {note}"
        for note, keys in by_note.items()
    ]
