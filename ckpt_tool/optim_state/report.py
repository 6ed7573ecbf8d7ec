"""Optimizer state for ``inspect`` (what is there, per parameter) and ``diff`` (how two states differ)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from ..checkpoint import Checkpoint
from ..errors import UsageError
from ..plan import initial_state
from .ids import MappingError, OptimizerState, find_optimizers, map_ids, moment_problems

# --- describing (inspect) -------------------------------------------------------------------------


@dataclass(frozen=True)
class GroupRow:
    """One param group as ``inspect`` shows it: its size and hyper-parameters (summarized)."""

    index: int
    params: int
    hyper: dict[str, Any]


@dataclass(frozen=True)
class StateRow:
    """One parameter id's state: the parameter it is (when known) and its tensors (name, shape, dtype)."""

    id: str
    parameter: str
    group: int
    tensors: tuple[tuple[str, tuple[int, ...], str], ...]
    values: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class OptimizerSummary:
    path: str
    kind: str
    groups: tuple[GroupRow, ...]
    state: tuple[StateRow, ...]
    tensors: int
    tensor_bytes: int
    mapped_by: str = ""  # how ids were tied to parameter names; empty when they could not be
    unmapped: str = ""  # why not


# an optimizer state found for a checkpoint: the state, the checkpoint whose parameters its ids
# name, and why its ids cannot be tied ("": they are, or the state dict ties them)
Found = tuple[OptimizerState, Checkpoint, str]


def _found(ckpt: Checkpoint, found: Sequence[Found] | None) -> Sequence[Found]:
    return found if found is not None else tuple((o, ckpt, "") for o in find_optimizers(ckpt))


def summarize_optimizers(ckpt: Checkpoint, *, found: Sequence[Found] | None = None) -> tuple[OptimizerSummary, ...]:
    """The optimizer states beside ``ckpt``'s state dict, described header-only (no tensor bytes).

    ``found``: the states to describe instead, as a layout of its own reads them (a Trainer's
    ``optimizer.pt``, whose ids follow its param groups)."""
    from ..reader import summarize

    out = []
    for opt, of, unmapped in _found(ckpt, found):
        try:
            if not unmapped:
                opt = map_ids(opt, of, (), initial_state(of.tensors))
        except UsageError as exc:
            unmapped = str(exc).partition(": ")[2].partition(" (pass")[0]
        names = opt.name_of()
        group_of = {i: g for g, group in enumerate(opt.groups) for i in group.params}
        rows = tuple(
            StateRow(
                str(s.id),
                names.get(s.id, ""),
                group_of.get(s.id, -1),
                tuple((n, r.shape, r.dtype) for n, r in s.tensors),
                {n: summarize(v) for n, v in s.values},
            )
            for s in opt.state
        )
        groups = tuple(
            GroupRow(i, len(g.params), {k: summarize(v) for k, v in g.hyper if k != "param_names"})
            for i, g in enumerate(opt.groups)
        )
        refs = [r for s in opt.state for _, r in s.tensors]
        out.append(
            OptimizerSummary(
                opt.path, opt.kind, groups, rows, len(refs), sum(r.nbytes for r in refs), opt.mapped_by, unmapped
            )
        )
    return tuple(out)


# --- comparing (diff) -----------------------------------------------------------------------------


@dataclass(frozen=True)
class OptimizerDiff:
    """Two checkpoints' optimizer states: each side's own defects, then how they differ, one line each.

    A side's defects: parameters without state, state whose moments do not have its parameter's shape
    (when ids can be tied to names), and ids that cannot be tied at all.
    """

    source: tuple[str, ...]
    target: tuple[str, ...]
    differences: tuple[str, ...]

    @property
    def found(self) -> bool:
        return bool(self.source or self.target or self.differences)


def compare_optimizers(
    a: Checkpoint, b: Checkpoint, *, found_a: Sequence[Found] | None = None, found_b: Sequence[Found] | None = None
) -> OptimizerDiff | None:
    """``None`` when neither checkpoint holds optimizer state beside its state dict.

    ``found_a``, ``found_b``: a side's optimizer states as its layout reads them (a Trainer
    directory's ``optimizer.pt``), instead of those beside its state dict."""
    sa, sb = _found(a, found_a), _found(b, found_b)
    if not sa and not sb:
        return None
    diffs: list[str] = []
    if len(sa) != len(sb):
        diffs.append(f"{len(sa)} optimizer states against {len(sb)}")
    named_a = [_by_name(*f) for f in sa]
    named_b = [_by_name(*f) for f in sb]
    for (oa, na, _), (ob, nb, _) in zip(named_a, named_b):
        where = oa.path if oa.path == ob.path else f"{oa.path} / {ob.path}"
        if oa.kind != ob.kind:
            diffs.append(f"{where}: {oa.kind} against {ob.kind}")
        if [len(g.params) for g in oa.groups] != [len(g.params) for g in ob.groups]:
            diffs.append(
                f"{where}: param groups of {[len(g.params) for g in oa.groups]} against "
                f"{[len(g.params) for g in ob.groups]} parameters"
            )
        for i, (ga, gb) in enumerate(zip(oa.groups, ob.groups)):
            ha, hb = dict(ga.hyper), dict(gb.hyper)
            changed = sorted(k for k in ha.keys() | hb.keys() if k != "param_names" and ha.get(k) != hb.get(k))
            if changed:
                diffs.append(
                    f"{where}: group {i}: " + ", ".join(f"{k} {ha.get(k)!r} -> {hb.get(k)!r}" for k in changed)
                )
        if na is None or nb is None:
            continue
        only_a, only_b = sorted(na.keys() - nb.keys()), sorted(nb.keys() - na.keys())
        if only_a:
            diffs.append(f"{where}: state only in the checkpoint for {_few(only_a)}")
        if only_b:
            diffs.append(f"{where}: state only in the target for {_few(only_b)}")
        for name in sorted(na.keys() & nb.keys()):
            if na[name] != nb[name]:
                diffs.append(f"{where}: {name}: state {_shapes(na[name])} against {_shapes(nb[name])}")
    return OptimizerDiff(
        tuple(p for _, _, ps in named_a for p in ps), tuple(p for _, _, ps in named_b for p in ps), tuple(diffs)
    )


def _by_name(
    opt: OptimizerState, ckpt: Checkpoint, unmapped: str = ""
) -> tuple[OptimizerState, dict[str, tuple[tuple[str, tuple[int, ...]], ...]] | None, list[str]]:
    """(the state, parameter name -> its state tensors' shapes or None when unmapped, the side's defects)."""
    if unmapped:
        return opt, None, [unmapped]
    try:
        opt = map_ids(opt, ckpt, (), initial_state(ckpt.tensors))
    except MappingError as exc:
        return opt, None, [str(exc).partition(": ")[2].partition(" (pass")[0]]
    name_of = opt.name_of()
    with_state = {s.id for s in opt.state}
    problems = [f"{opt.path}: {p}" for p in moment_problems(opt, name_of, ckpt)]
    without = [name_of[i] for i in opt.ids if i not in with_state]
    if without:
        problems.append(f"{opt.path}: {len(without)} parameters without state ({_few(without)})")
    shapes = {name_of[s.id]: tuple((n, r.shape) for n, r in s.tensors) for s in opt.state}
    return opt, shapes, problems


def _few(names: Sequence[str], limit: int = 3) -> str:
    return ", ".join(names[:limit]) + (f" and {len(names) - limit} more" if len(names) > limit else "")


def _shapes(state: tuple[tuple[str, tuple[int, ...]], ...]) -> str:
    return ", ".join(f"{n} {list(shape)}" for n, shape in state)
