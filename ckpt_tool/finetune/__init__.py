"""``finetune-check``: load a checkpoint into a model, freeze, train briefly, and check it all -> FinetuneReport.

Before a team spends a GPU-day fine-tuning, this answers in a minute: do the weights load, does
the model run, does training move only what should move, and does the loss go down?

The package, in the order a run goes through it: ``options`` (what can be asked), ``load``
(migrate operations, the load report), ``head``, ``freeze``, ``probe`` (one forward pass with
hooks), ``data``, ``train``, ``checks`` (verdicts), ``report`` (the frozen results), ``output``
(save, plot), ``distributed`` (torch.distributed) and ``run`` (:func:`finetune_check`).

torch is imported inside the functions that need it: importing this package stays cheap.
"""

from __future__ import annotations

from ..compat import Mismatch
from .freeze import expand_pattern, matches, select_trainable
from .head import HEAD_NAMES, find_head, replace_head
from .options import FinetuneOptions
from .report import (
    CHECK_NAMES,
    FAIL,
    INFO,
    PASS,
    SKIP,
    Check,
    FinetuneReport,
    HeadChange,
    LoadReport,
    ModuleParams,
    Phase,
    ProgressEvent,
    TrainingProgress,
)
from .run import finetune_check

__all__ = [
    "CHECK_NAMES",
    "FAIL",
    "HEAD_NAMES",
    "INFO",
    "PASS",
    "SKIP",
    "Check",
    "FinetuneOptions",
    "FinetuneReport",
    "HeadChange",
    "LoadReport",
    "Mismatch",
    "ModuleParams",
    "Phase",
    "TrainingProgress",
    "ProgressEvent",
    "expand_pattern",
    "find_head",
    "finetune_check",
    "matches",
    "replace_head",
    "select_trainable",
]
