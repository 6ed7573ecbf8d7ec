"""The reports ``ckpt diff`` returns, and the statuses of a key (they mirror ``load_state_dict(strict=False)``)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ..arch import TargetSignature
from ..checkpoint import Checkpoint
from ..optim_state import OptimizerDiff
from ..plan import Plan
from .align import Alignment
from .shapeflow import ShapeFlow

MATCHED, DTYPE, SHAPE, MISSING, UNEXPECTED, MIXED = "matched", "dtype", "shape", "missing", "unexpected", "mixed"
# not in the checkpoint, but torch fills it in itself (BatchNorm's num_batches_tracked without version metadata)
AUTO = "auto"
# not in the checkpoint, but tied to a key that is: loading the partner sets it
TIED = "tied"


@dataclass(frozen=True, slots=True)  # slots: a diff of 100,000 keys holds 100,000 of them
class KeyDiff:
    """One key of either side; shapes and dtypes are ``None`` on the side that lacks the key."""

    key: str
    status: str
    source_shape: tuple[int, ...] | None
    source_dtype: str | None
    target_shape: tuple[int, ...] | None
    target_dtype: str | None
    max_abs_diff: float | None = None
    rel_change: float | None = None


@dataclass(frozen=True)
class Row:
    """A table row: one key, a folded run of keys (``layer1.{0..1}.conv1.weight``) or, with ``depth``, a module."""

    name: str
    status: str
    keys: int
    source_shape: tuple[int, ...] | None = None
    source_dtype: str | None = None
    target_shape: tuple[int, ...] | None = None
    target_dtype: str | None = None
    source_numel: int = 0
    target_numel: int = 0
    statuses: dict[str, int] = field(default_factory=dict)
    max_abs_diff: float | None = None
    rel_change: float | None = None


@dataclass(frozen=True)
class DiffCounts:
    """``matched`` counts keys on both sides whose shapes agree (dtype differences included, they load)."""

    source_keys: int
    target_keys: int
    matched: int
    missing: int
    unexpected: int
    shape_mismatches: int
    dtype_differences: int
    target_numel: int
    filled_numel: int
    auto_filled: int = 0
    tied: int = 0
    changed: int | None = None
    unchanged: int | None = None

    @property
    def filled_share(self) -> float:
        """Share of the target's elements the checkpoint would fill (what ``strict=False`` really loads)."""
        return self.filled_numel / self.target_numel if self.target_numel else 1.0

    def to_json(self) -> dict[str, Any]:
        out = {name: getattr(self, name) for name in self.__dataclass_fields__}
        out["filled_share"] = round(self.filled_share, 6)
        return out


@dataclass(frozen=True)
class PlanStep:
    operation: dict[str, Any]
    reason: str
    keys: int


@dataclass(frozen=True)
class FixPlan:
    """Operations that make the checkpoint load strictly, as ``ckpt migrate`` flags and as a plan document.

    ``resolves`` is whether the operations, simulated on the keys, leave nothing that would fail a strict
    load; ``checkpoint_share`` is the share of an architecture's parameters the checkpoint would give
    after them, and ``mostly_new`` says it is under half (then ``command`` is ``None``: a fix would
    keep mostly fresh initialisation, which is no fix, nor when ``cannot_run`` says the target's forward
    fails); ``notes`` says what the plan cannot decide (ambiguous renames, values it has no source for).
    """

    steps: tuple[PlanStep, ...]
    document: dict[str, Any]
    command: str | None
    resolves: bool
    notes: tuple[str, ...] = ()
    plan: Plan = field(default_factory=Plan, repr=False)
    checkpoint_share: float = 1.0  # of the target's parameter elements, after the operations
    mostly_new: bool = False
    alignment: Alignment | None = None  # the keys a proposed --map pairs by position, and its confidence
    map_file: str | None = None  # the --map file the command reads (ckpt diff --map-out writes it)
    cannot_run: str = ""  # the target's forward fails (shape flow): why no command is offered


@dataclass(frozen=True)
class DiffReport:
    source: str
    source_format: str
    source_key: str | None
    target: str
    target_kind: str  # "arch" or "checkpoint"
    target_key: str | None
    arch_args: dict[str, Any]
    cache: str | None
    counts: DiffCounts
    loads_strictly: bool
    keys: tuple[KeyDiff, ...]
    rows: tuple[Row, ...]
    hidden_rows: int
    depth: int | None
    values: bool
    plan: FixPlan
    plan_path: str | None = None
    notes: tuple[str, ...] = ()
    shape_flow: ShapeFlow | None = None  # the target's forward on the meta device (--arch targets)
    map_path: str | None = None  # where --map-out wrote the proposed map
    # two training checkpoints: their optimizer states (ckpt_tool.optim_state)
    optimizer: OptimizerDiff | None = None

    @property
    def ok(self) -> bool:
        """Loads strictly, and the target's forward does not fail (exit 0)."""
        return self.loads_strictly and not (self.shape_flow is not None and self.shape_flow.fails)


DiffTarget = TargetSignature | Checkpoint
