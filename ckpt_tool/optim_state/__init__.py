"""Training state through surgery: optimizer state, schedulers, scalers, counters and EMA copies.

torch's ``optimizer.state_dict()`` names parameters by integer ids: their positions in the param
groups as the optimizer was built, which for the usual ``model.parameters()`` is the model's
parameter order. To carry the state through a plan, each id is first tied to a parameter name of
the source (:func:`map_ids`); the state of a kept parameter then follows it to its new name and
position, a dropped parameter's state goes, a filled or re-initialised parameter gets none (the
optimizer starts it fresh, as torch does for a new parameter) and a cast parameter's moments are
cast with it (``step`` is not: torch never casts it either).

Header-only and torch-free: the output tree holds :class:`~ckpt_tool.writer.TensorSlot` markers
where tensors go; the planned values are :class:`~ckpt_tool.plan.Entry` objects under keys that
start with :data:`CARRIED`, streamed by the writer like any other tensor.

A Hugging Face ``Trainer`` checkpoint directory (``optimizer.pt`` beside the weights, ids in the
Trainer's weight decay / no weight decay groups) goes through :mod:`.trainer`.
"""

from __future__ import annotations

from .carry import CARRIED, AlsoPlan, Carried, OptimizerPlan, carry, training_state, verify_carried
from .ids import (
    MappingError,
    OptimizerState,
    ParamGroup,
    ParamState,
    find_optimizers,
    is_optimizer_state,
    map_ids,
    moment_problems,
    parameter_order,
    read_optimizer,
)
from .report import OptimizerDiff, OptimizerSummary, compare_optimizers, summarize_optimizers

__all__ = [
    "CARRIED",
    "AlsoPlan",
    "Carried",
    "MappingError",
    "OptimizerDiff",
    "OptimizerPlan",
    "OptimizerState",
    "OptimizerSummary",
    "ParamGroup",
    "ParamState",
    "carry",
    "compare_optimizers",
    "find_optimizers",
    "is_optimizer_state",
    "map_ids",
    "moment_problems",
    "parameter_order",
    "read_optimizer",
    "summarize_optimizers",
    "training_state",
    "verify_carried",
]
