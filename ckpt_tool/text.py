"""Plain-text helpers for the messages library code builds (errors, check details); no output, no click."""

from __future__ import annotations

from collections.abc import Iterable


def some(items: Iterable[str], limit: int = 3) -> str:
    """The first ``limit`` items, then how many more: ``"a, b, c and 4 more"``."""
    items = list(items)
    return ", ".join(items[:limit]) + (f" and {len(items) - limit} more" if len(items) > limit else "")
