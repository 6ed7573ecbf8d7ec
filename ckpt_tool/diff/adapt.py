"""Fix-plan steps that change values or depth: an input conv with other input channels, a position
embedding with another token count, a target with more or fewer repeated blocks.

Each is proposed only when it is the whole difference of what it touches, and only after it has been
simulated with the operation itself (:mod:`ckpt_tool.adapt`, :mod:`ckpt_tool.depth`) on the keys and shapes.
"""

from __future__ import annotations

from typing import Any

from ..arch import TargetSignature
from ..errors import UsageError
from ..plan import CHECKPOINT, Entry, State
from ..plan import operation as plan_operation
from .report import PlanStep

Shapes = dict[str, tuple[int, ...]]


def adaptation_steps(
    current: Shapes, target: TargetSignature, arch: str | None
) -> tuple[list[PlanStep], Shapes, list[str]]:
    """The steps, the shapes after them, and notes (what only an architecture could do)."""
    from ..adapt import infer_prefix_tokens
    from ..depth import blocks, depth_changes

    tgt = {k: t.shape for k, t in target.tensors.items()}
    steps: list[PlanStep] = []
    notes: list[str] = []

    conv = next((k for k, s in current.items() if len(s) == 4 and k.endswith(".weight")), None)
    if conv is not None and conv in tgt and _only_dim_differs(current[conv], tgt[conv], 1):
        have, want = current[conv][1], tgt[conv][1]
        module = conv[: -len(".weight")]
        params: dict[str, Any] = {"module": module} if arch else {"module": module, "in_chans": want}
        how = "summed over RGB" if want == 1 else f"repeated and scaled by 3/{want}"
        current = _try(
            steps,
            current,
            target,
            "adapt_input_conv",
            params,
            f"the first conv {module} takes {have} input channels, the target {want}: keep its trained "
            f"filters, {how} (timm's adapt_input_conv)",
            1,
        )

    for key in [k for k in current if "pos" in k.lower() and k in tgt]:
        have_s, want_s = current[key], tgt[key]
        if len(have_s) != 3 or have_s[0] != 1 or not _only_dim_differs(have_s, want_s, 1):
            continue
        prefix = infer_prefix_tokens(have_s[1], want_s[1])
        if prefix is None:
            continue
        side = round((want_s[1] - prefix) ** 0.5)
        params = {"key": key} if arch else {"key": key, "grid": [side, side], "prefix_tokens": prefix}
        old = round((have_s[1] - prefix) ** 0.5)
        current = _try(
            steps,
            current,
            target,
            "resample_pos_embed",
            params,
            f"{key} holds a {old}x{old} grid, the target a {side}x{side} one ({prefix} prefix token{'s' * (prefix != 1)}): "
            "resample it bicubically (timm's resample_abs_pos_embed)",
            1,
        )

    changes = depth_changes(current, tgt)
    have_blocks, want_blocks = blocks(current), blocks(tgt)
    fitting = {s: c for s, c in changes.items() if _common_blocks_agree(have_blocks[s], want_blocks[s], current, tgt)}
    for op, policy, other, grow in (
        ("grow_blocks", "nearest", "identity", True),
        ("shrink_blocks", "first", "every-k", False),
    ):
        stages = {s: c for s, c in fitting.items() if (c[1] > c[0]) == grow}
        if not stages:
            continue
        shown = ", ".join(f"{s} {n} -> {m}" for s, (n, m) in stages.items())
        if arch is None:
            notes.append(
                f"the target has {'more' if grow else 'fewer'} repeated blocks ({shown}); with --arch the "
                f"plan would --{op.replace('_', '-')} {policy}"
            )
            continue
        n_keys = sum(
            len(r)
            for s, (n, m) in stages.items()
            for i in range(min(n, m), max(n, m))
            for r in [(want_blocks if grow else have_blocks)[s][i]]
        )
        why = (
            f"the target has more repeated blocks ({shown}): each new block copies the nearest trained one "
            f"(--grow-blocks {other} makes them identities instead)"
            if grow
            else f"the target has fewer repeated blocks ({shown}): keep the first of each stage "
            f"(--shrink-blocks {other} keeps every k-th instead)"
        )
        current = _try(steps, current, target, op, {"policy": policy}, why, n_keys)
    return steps, current, notes


def _only_dim_differs(a: tuple[int, ...], b: tuple[int, ...], dim: int) -> bool:
    return len(a) == len(b) and a[dim] != b[dim] and all(x == y for i, (x, y) in enumerate(zip(a, b)) if i != dim)


def _common_blocks_agree(
    have: dict[int, dict[str, str]], want: dict[int, dict[str, str]], current: Shapes, tgt: Shapes
) -> bool:
    """Whether the blocks both sides have hold the same keys and shapes: the stages differ in depth only."""
    return all(
        set(have[i]) == set(want[i]) and all(current[have[i][r]] == tgt[want[i][r]] for r in have[i])
        for i in range(min(len(have), len(want)))
    )


def _try(
    steps: list[PlanStep],
    current: Shapes,
    target: TargetSignature,
    op: str,
    params: dict[str, Any],
    reason: str,
    keys: int,
) -> Shapes:
    """Simulate the operation on the shapes; keep it (and its result) only when it applies."""
    state: State = {k: Entry(k, "float32", s, CHECKPOINT, k, "float32") for k, s in current.items()}
    try:
        after = plan_operation(op, **params).apply(state, target)
    except UsageError:
        return current
    steps.append(PlanStep({"op": op, **params}, reason, keys))
    return {k: e.shape for k, e in after.items()}
