"""Options several commands share, declared once: ``--key``, ``--arch``, ``--arch-arg``, ``--allow`` and the plan operations.

The operation options (``--drop``, ``--rename``, ``--fill-missing``...) apply in the order they are
given, interleaved (``--rename a=b --drop c --rename d=e``). Click gathers each option's values
separately, so a command that takes them is built with ``cls=OrderedCommand``, which records the
command-line order; :func:`plan_operation_options` then hands the command one ``operations``
argument, built by :mod:`ckpt_tool.plan` (the one owner of flags -> operations).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, TypeVar, overload

import click

F = TypeVar("F", bound=Callable[..., Any])

ARCH_HELP = (
    "Target architecture: a torchvision name (vgg16), pkg.module:factory, path/to/file.py:factory, "
    "timm:NAME or hf:PATH (a Hugging Face config.json or its directory). Built with random weights, "
    "never downloaded."
)
ARCH_ARG_HELP = "Keyword argument for --arch (repeatable; values are Python literals: num_classes=10)."
KEY_HELP = "Nested state dict to use (model_state_dict, state_dict/ema; see `ckpt inspect`)."

_ORDER_KEY = "ckpt.operation_order"

# parameter name -> the flag plan.py knows it by; declared in this order in --help
_OPERATION_OPTIONS: tuple[tuple[str, str, str | None, str], ...] = (
    (
        "drop",
        "--drop",
        "PREFIX",
        "Drop a module and everything under it (classifier.6 drops classifier.6.weight, not classifier.60.weight).",
    ),
    ("keep", "--keep", "REGEX", "Keep only the keys REGEX matches (re.search)."),
    ("exclude", "--exclude", "REGEX", "Drop the keys REGEX matches (re.search)."),
    ("rename", "--rename", "REGEX=REPL", "Rename keys with re.sub (groups as \\1); split at the last '='."),
    ("strip_prefix", "--strip-prefix", "PREFIX", "Remove PREFIX (module.) where keys start with it."),
    ("add_prefix", "--add-prefix", "PREFIX", "Put PREFIX (backbone.) in front of every key."),
    ("map_file", "--map", "FILE", "Rename by a JSON object of old key -> new key."),
    (
        "dtype",
        "--dtype",
        "DTYPE",
        "Cast floating tensors (float16, bfloat16, float32; integer tensors and buffers "
        "such as num_batches_tracked are untouched).",
    ),
    (
        "plan_file",
        "--plan",
        "FILE",
        "Apply a plan saved by `ckpt diff --plan-out`, where it stands among the "
        "operations (its source, --key and --arch apply unless given).",
    ),
    (
        "fill_missing",
        "--fill-missing",
        None,
        "Keys the target has and the checkpoint lacks take the target's "
        "initialisation (a tied alias takes its partner's tensor).",
    ),
    ("drop_unexpected", "--drop-unexpected", None, "Drop keys the target has no place for."),
    (
        "reinit_mismatched",
        "--reinit-mismatched",
        None,
        "Keys whose shape would not load take the target's initialisation.",
    ),
    (
        "adapt_input_conv",
        "--adapt-input-conv",
        "MODULE[=N]",
        "Adapt MODULE.weight to the target's input channels "
        "(or N) as timm's adapt_input_conv does: summed over RGB for 1, repeated and scaled by 3/N for N.",
    ),
    (
        "resample_pos_embed",
        "--resample-pos-embed",
        "KEY[=[P+]HxW]",
        "Resample the position embedding KEY to the "
        "target's grid (or HxW, after P prefix tokens) as timm's resample_abs_pos_embed does (bicubic, antialiased).",
    ),
    (
        "grow_blocks",
        "--grow-blocks",
        "nearest|identity",
        "Blocks the target has beyond the checkpoint's (layer1.N, "
        "encoder.layer.N, blocks.N): copies of the nearest trained block, or identity blocks (last norm or output "
        "projections zeroed).",
    ),
    (
        "shrink_blocks",
        "--shrink-blocks",
        "first|every-k",
        "Fewer blocks in the target: keep the first N, or every k-th (k = checkpoint's / target's), renumbered.",
    ),
)
OPERATION_PARAMS = tuple(name for name, *_ in _OPERATION_OPTIONS)


@overload
def key_option(func: F) -> F: ...
@overload
def key_option(*, help: str) -> Callable[[F], F]: ...


def key_option(func: F | None = None, *, help: str = KEY_HELP) -> F | Callable[[F], F]:
    """``--key PATH``: the nested state dict to use; ``@key_option(help=...)`` where a command says it its own way."""

    def decorate(f: F) -> F:
        return click.option("--key", metavar="PATH", help=help)(f)

    return decorate(func) if func is not None else decorate


def target_key_option(func: F) -> F:
    """``--target-key PATH``: the nested state dict of a TARGET checkpoint."""
    return click.option("--target-key", metavar="PATH", help="Nested state dict of TARGET to use.")(func)


def no_cache_option(func: F) -> F:
    """``--no-cache``: build an ``--arch`` signature afresh."""
    return click.option(
        "--no-cache",
        is_flag=True,
        help="Build the target's signature afresh (needs torch); neither "
        "read the shipped table or the cache nor write the cache.",
    )(func)


def arch_option(func: F | None = None, *, required: bool = False) -> Any:
    """``--arch SPEC``; ``@arch_option(required=True)`` where a command cannot work without one."""

    def decorate(f: F) -> F:
        return click.option("--arch", metavar="SPEC", required=required, help=ARCH_HELP)(f)

    return decorate(func) if func is not None else decorate


def arch_arg_option(func: F) -> F:
    """``--arch-arg NAME=VALUE`` (repeatable), passed as ``arch_args``."""
    return click.option("--arch-arg", "arch_args", multiple=True, metavar="NAME=VALUE", help=ARCH_ARG_HELP)(func)


def allow_option(func: F) -> F:
    """``--allow MODULE.NAME`` (repeatable): one more trusted global, for scan's verdict (scan, validate)."""
    return click.option(
        "--allow",
        "allow",
        multiple=True,
        metavar="MODULE.NAME",
        help="Trust one more global (repeatable): an exact name such as mypkg.models.Net, or mypkg.* for a "
        "module. Adds to `allow` in [tool.ckpt] of pyproject.toml. Denied names (os, subprocess, ...) stay denied.",
    )(func)


def pager_option(func: F) -> F:
    """``--no-pager``: print a long table straight to the terminal (pipes are never paged)."""
    return click.option(
        "--no-pager",
        is_flag=True,
        help="Never page the output (it is paged with $PAGER only on a terminal it overflows).",
    )(func)


class OrderedCommand(click.Command):
    """Records the order of the operation options on the command line (Click keeps only each option's values)."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        _, _, order = self.make_parser(ctx).parse_args(args=list(args))
        ctx.meta[_ORDER_KEY] = [p.name for p in order if p.name in OPERATION_PARAMS]
        return super().parse_args(ctx, args)


def plan_operation_options(func: F) -> F:
    """Add the operation options; the command receives ``operations`` (a tuple of ``plan.Operation``,
    in command-line order, ``--plan`` files expanded where they stand) and ``plan_base`` (the first
    ``--plan`` file's :class:`~ckpt_tool.plan.Plan`, for its source, key and arch; an empty plan without one).

    The command must be declared with ``@click.command(cls=OrderedCommand)``.
    """

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        values = {name: kwargs.pop(name) for name in OPERATION_PARAMS}
        ctx = click.get_current_context()
        if _ORDER_KEY not in ctx.meta:
            raise TypeError(f"{ctx.command.name}: declare it with @click.command(cls=OrderedCommand)")
        kwargs["operations"], kwargs["plan_base"] = ordered_operations(ctx.meta[_ORDER_KEY], values)
        return func(*args, **kwargs)

    decorated: Any = wrapper
    for name, flag, metavar, help_text in reversed(_OPERATION_OPTIONS):
        if metavar is None:
            decorated = click.option(flag, name, is_flag=True, help=help_text)(decorated)
        elif name == "dtype":
            decorated = click.option(
                flag, name, multiple=True, type=click.Choice(["float16", "bfloat16", "float32"]), help=help_text
            )(decorated)
        elif name in ("map_file", "plan_file"):
            decorated = click.option(
                flag, name, multiple=True, metavar=metavar, type=click.Path(dir_okay=False), help=help_text
            )(decorated)
        else:
            decorated = click.option(flag, name, multiple=True, metavar=metavar, help=help_text)(decorated)
    result: F = decorated
    return result


def ordered_operations(order: list[str], values: dict[str, Any]) -> tuple[tuple[Any, ...], Any]:
    """The operations that ``order`` (parameter names, one per occurrence) and their values give."""
    from ..plan import Plan, load_plan, operation_from_flag

    flags = {name: flag for name, flag, *_ in _OPERATION_OPTIONS}
    ops: list[Any] = []
    base = Plan()
    seen: dict[str, int] = {}
    for name in order:
        i = seen.get(name, 0)
        seen[name] = i + 1
        value = values[name]
        if isinstance(value, tuple):
            value = value[i]
        if name == "plan_file":
            loaded = load_plan(value)
            base = loaded if base.source is None and not base.operations else base
            ops.extend(loaded.operations)
        else:
            ops.append(operation_from_flag(flags[name], None if isinstance(value, bool) else value))
    return tuple(ops), base
