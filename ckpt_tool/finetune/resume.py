"""``--resume-optimizer``: start the fine-tune from the optimizer state a training checkpoint carries.

The ids are tied to parameter names by :func:`ckpt_tool.optim_state.map_ids` (the same rule as
``migrate``); each trainable parameter whose name has state gets it, on its device, its moments in
its dtype (``step`` stays as saved, as torch keeps it). Hyper-parameters are finetune-check's own.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

from ..checkpoint import Checkpoint
from ..errors import UsageError
from ..optim_state import find_optimizers, map_ids
from ..plan import initial_state

# the state each --optimizer reads back (torch's Adam and SGD keys)
_NEEDS = {"adam": {"exp_avg", "exp_avg_sq", "step"}, "sgd": {"momentum_buffer"}}


@dataclass(frozen=True)
class Resume:
    """The saved state per parameter name (tensors read), and what kind of optimizer wrote it."""

    kind: str
    state: dict[str, dict[str, Any]]


def read_resume(ckpt: Checkpoint, optimizer: str, *, path: str = "", model: Any = None) -> Resume:
    """The optimizer state beside ``ckpt``'s state dict, keyed by parameter name (reads its tensors).

    When ``path`` is a Hugging Face Trainer directory, the state is its ``optimizer.pt``, the ids
    tied by the Trainer's param groups (of the model its ``config.json`` describes, else of
    ``model``, the model trained now; both must agree when both fit), as ``migrate`` reads that layout."""
    from ..formats.hf_trainer import OPTIMIZER, is_trainer_dir
    from ..values import torch_state_dict

    if path and is_trainer_dir(path):
        from ..optim_state.trainer import read_trainer_optimizer, tie_trainer_ids

        if not os.path.isfile(os.path.join(path, OPTIMIZER)):
            raise UsageError(f"{path}: --resume-optimizer: the Trainer checkpoint holds no {OPTIMIZER}")
        found, view = read_trainer_optimizer(path, ckpt)
        opt = tie_trainer_ids(found, view, path, model=model)
    else:
        candidates = find_optimizers(ckpt)
        if not candidates:
            raise UsageError(f"{ckpt.path}: --resume-optimizer: no optimizer state beside the state dict")
        opt = map_ids(candidates[0], ckpt, (), initial_state(ckpt.tensors))
    names = {n for s in opt.state for n, _ in s.tensors} | {n for s in opt.state for n, _ in s.values}
    if opt.state and not _NEEDS[optimizer] <= names:
        raise UsageError(
            f"{ckpt.path}: --resume-optimizer: {opt.path} holds {opt.kind} state "
            f"({', '.join(sorted(names))}), which --optimizer {optimizer} cannot resume from"
        )
    name_of = opt.name_of()
    refs = {f"{s.id}/{n}": r for s in opt.state for n, r in s.tensors}
    tensors = torch_state_dict(refs)
    state = {name_of[s.id]: {**dict(s.values), **{n: tensors[f"{s.id}/{n}"] for n, _ in s.tensors}} for s in opt.state}
    return Resume(opt.kind, state)


def apply_resume(optimizer: Any, named: list[tuple[str, Any]], resume: Resume) -> tuple[int, int]:
    """Give each parameter of ``optimizer`` its saved state by name: (parameters resumed, starting fresh)."""
    in_optimizer = {id(p) for g in optimizer.param_groups for p in g["params"]}
    resumed = fresh = 0
    for name, p in named:
        if id(p) not in in_optimizer:
            continue
        saved = resume.state.get(name) or next((v for k, v in resume.state.items() if k.endswith("." + name)), None)
        if saved is None or any(getattr(v, "shape", p.shape) not in ((), p.shape) for v in saved.values()):
            fresh += 1
            continue
        optimizer.state[p] = {
            k: v.to(p.device, p.dtype) if getattr(v, "shape", ()) == p.shape else v for k, v in saved.items()
        }
        resumed += 1
    return resumed, fresh


def resume_check(resume: Resume, tracker: Any) -> Any:
    """PASS when the saved state reached at least one trainable parameter and training then ran."""
    from .report import FAIL, PASS, Check

    resumed, fresh = tracker.resumed or (0, 0)
    if not resumed:
        return Check(
            "optimizer resumed",
            FAIL,
            f"no trainable parameter has saved {resume.kind} state "
            f"({len(resume.state)} parameters in the checkpoint have some)",
        )
    return Check(
        "optimizer resumed",
        PASS,
        f"{resume.kind} state of {resumed} parameters loaded" + (f", {fresh} start fresh" if fresh else ""),
    )
