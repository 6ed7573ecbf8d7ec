"""``ckpt diff``: a checkpoint against an architecture or another checkpoint, and a fix plan.

The package by concern: :mod:`.engine` (open both sides and compare, with :mod:`ckpt_tool.compat`'s
rule), :mod:`.report` (the frozen reports and statuses), :mod:`.valuediff` (``--values``),
:mod:`.rows` (the table: ``--depth`` and folding) and :mod:`.fix` (the suggested ``ckpt migrate`` plan).
"""

from __future__ import annotations

from ..compat import shapes_load
from .engine import diff, diff_paths
from .fix import MAX_DROP_PREFIXES, suggest_plan
from .report import (
    AUTO,
    DTYPE,
    MATCHED,
    MISSING,
    MIXED,
    SHAPE,
    TIED,
    UNEXPECTED,
    DiffCounts,
    DiffReport,
    DiffTarget,
    FixPlan,
    KeyDiff,
    PlanStep,
    Row,
)
from .rows import fold_leaves, fold_rows, format_indices
from .valuediff import VALUE_CHUNK_ELEMENTS, compare_values

__all__ = [
    "AUTO",
    "DTYPE",
    "MATCHED",
    "MAX_DROP_PREFIXES",
    "MISSING",
    "MIXED",
    "SHAPE",
    "TIED",
    "UNEXPECTED",
    "VALUE_CHUNK_ELEMENTS",
    "DiffCounts",
    "DiffReport",
    "FixPlan",
    "KeyDiff",
    "PlanStep",
    "Row",
    "DiffTarget",
    "compare_values",
    "diff",
    "diff_paths",
    "fold_leaves",
    "fold_rows",
    "format_indices",
    "shapes_load",
    "suggest_plan",
]
