"""Plain-text helpers for the messages library code builds (errors, check details); no output, no click."""

from __future__ import annotations

from collections.abc import Iterable, Sequence


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


def human_bytes(n: float | None) -> str:
    """``1536`` -> ``"1.5 KB"`` (binary units); ``None`` -> ``"-"``."""
    if n is None:
        return "-"
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1024 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TB"


def human_count(n: int) -> str:
    """``11689512`` -> ``"11.69M"``."""
    if abs(n) >= 1_000_000_000:
        return f"{n / 1e9:.2f}B"
    if abs(n) >= 1_000_000:
        return f"{n / 1e6:.2f}M"
    if abs(n) >= 10_000:
        return f"{n / 1e3:.1f}K"
    return str(n)


def shape_str(shape: Sequence[int] | None) -> str:
    """``(3, 4)`` -> ``"[3, 4]"``; ``None`` -> ``"-"``."""
    return "-" if shape is None else "[" + ", ".join(str(d) for d in shape) + "]"
