"""Surgery plans: operations as small pure functions over a description of the state being written.

A *state* maps output key -> :class:`Entry`, an entry says where a tensor's values come from (a
tensor of the checkpoint, or the target model's own initialisation) and what it becomes (name,
dtype, shape). Operations never touch tensor bytes; the writer moves them afterwards.

A plan is saved as JSON (``ckpt diff --plan-out`` writes the same form)::

    {"version": 1, "source": "a.pth", "key": null, "arch": "resnet18", "arch_args": {},
     "operations": [{"op": "strip_prefix", "prefix": "module."}, {"op": "reinit_mismatched"}]}
"""

from __future__ import annotations

import json
import os
import re
import shlex
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from .arch import TargetSignature, TargetTensor
from .checkpoint import TensorRef, in_module, is_floating
from .compat import shapes_load
from .errors import InputError, UsageError

PLAN_VERSION = 1
CAST_DTYPES = ("float16", "bfloat16", "float32")

CHECKPOINT = "checkpoint"
TARGET = "target"


@dataclass(frozen=True)
class Entry:
    """One tensor of the planned output.

    ``source`` is ``"checkpoint"`` (bytes of ``ref``, read from the input) or ``"target"`` (the
    target model's fresh initialisation of ``origin``); ``source_dtype`` is what those bytes hold
    and ``dtype`` what is written (they differ after a cast).
    """

    key: str
    dtype: str
    shape: tuple[int, ...]
    source: str
    origin: str
    source_dtype: str
    ref: TensorRef | None = None
    reason: str = ""
    tied_to: str = ""  # an alias filled from its present tie partner: that partner's key
    replaces: str = ""  # re-initialised: the origin of the checkpoint tensor it replaces (its optimizer group)
    # values computed from the source when written, not its bytes as they are (see ckpt_tool.adapt)
    transform: tuple[Any, ...] = ()

    @property
    def from_checkpoint(self) -> bool:
        return self.source == CHECKPOINT

    @classmethod
    def from_ref(cls, ref: TensorRef) -> Entry:
        return cls(ref.key, ref.dtype, ref.shape, CHECKPOINT, ref.key, ref.dtype, ref)

    @classmethod
    def from_target(cls, key: str, t: TargetTensor, reason: str) -> Entry:
        return cls(key, t.dtype, t.shape, TARGET, key, t.dtype, None, reason)


State = dict[str, Entry]
# the policies take a signature (with its tie groups) or just its key -> tensor table
Target = TargetSignature | Mapping[str, TargetTensor]


def _tensors(target: Target) -> Mapping[str, TargetTensor]:
    return target.tensors if isinstance(target, TargetSignature) else target


# --- the pure functions --------------------------------------------------------------------------


def drop(state: State, prefix: str) -> State:
    """Drop a module and everything under it: ``classifier.6`` drops ``classifier.6.weight``, not ``classifier.60.weight``."""
    return {k: e for k, e in state.items() if not in_module(k, prefix)}


def keep(state: State, pattern: str) -> State:
    """Keep only the keys the regular expression finds a match in."""
    rx = _regex(pattern, "keep")
    return {k: e for k, e in state.items() if rx.search(k)}


def exclude(state: State, pattern: str) -> State:
    """Drop the keys the regular expression finds a match in."""
    rx = _regex(pattern, "exclude")
    return {k: e for k, e in state.items() if not rx.search(k)}


def rename(state: State, pattern: str, replacement: str) -> State:
    """Rename keys with ``re.sub(pattern, replacement, key)``; two keys may not end with one name."""
    rx = _regex(pattern, "rename")

    def new_name(key: str) -> str:
        try:
            return rx.sub(replacement, key)
        except (re.error, IndexError) as exc:
            raise UsageError(f"--rename {pattern}={replacement}: bad replacement ({exc})") from None

    return _rekey(state, new_name, f"--rename {pattern}={replacement}")


def strip_prefix(state: State, prefix: str) -> State:
    """Remove ``prefix`` from the keys that start with it (``module.`` of DataParallel)."""
    return _rekey(state, lambda k: k[len(prefix) :] if k.startswith(prefix) else k, f"--strip-prefix {prefix}")


def add_prefix(state: State, prefix: str) -> State:
    """Put ``prefix`` in front of every key (``backbone.``)."""
    return _rekey(state, lambda k: prefix + k, f"--add-prefix {prefix}")


def map_keys(state: State, mapping: Mapping[str, str]) -> State:
    """Rename keys by an explicit ``old -> new`` table; keys it does not name are kept as they are."""
    return _rekey(state, lambda k: mapping.get(k, k), "--map")


def cast(state: State, dtype: str) -> State:
    """Cast floating tensors to ``dtype``; integer tensors and buffers (``num_batches_tracked``) are untouched."""
    if dtype not in CAST_DTYPES:
        raise UsageError(f"--dtype {dtype}: choose one of {', '.join(CAST_DTYPES)}")
    return {k: replace(e, dtype=dtype) if is_floating(e.dtype) and e.dtype != dtype else e for k, e in state.items()}


def fill_missing(state: State, target: Target) -> State:
    """Add the target's keys the state lacks: a tied alias (``lm_head.weight``) takes its present partner's
    tensor, since loading a fresh value into it would overwrite the shared, trained one; other keys take
    the target's own initialisation."""
    tensors = _tensors(target)
    partners = target.partners() if isinstance(target, TargetSignature) else {}
    out = dict(state)
    for key, t in tensors.items():
        if key in out:
            continue
        partner = next((p for p in partners.get(key, ()) if p in state and shapes_load(state[p].shape, t.shape)), None)
        if partner is not None:
            out[key] = replace(state[partner], key=key, reason="tied", tied_to=partner)
        else:
            out[key] = Entry.from_target(key, t, "fill_missing")
    return out


def drop_unexpected(state: State, target: Target) -> State:
    """Drop the keys the target has no place for."""
    tensors = _tensors(target)
    return {k: e for k, e in state.items() if k in tensors}


def reinit_mismatched(state: State, target: Target) -> State:
    """Replace the keys whose shape would not load into the target's by the target's initialisation."""
    tensors = _tensors(target)
    return {
        k: replace(Entry.from_target(k, tensors[k], "reinit_mismatched"), replaces=e.origin)
        if k in tensors and not shapes_load(e.shape, tensors[k].shape)
        else e
        for k, e in state.items()
    }


def _rekey(state: State, new_name: Callable[[str], str], what: str) -> State:
    out: State = {}
    for key, entry in state.items():
        name = new_name(key)
        if not name:
            raise UsageError(f"{what}: renames {key!r} to an empty key")
        if name in out:
            other = next(k for k in state if new_name(k) == name)
            raise UsageError(f"{what}: maps both {other!r} and {key!r} to {name!r}")
        out[name] = replace(entry, key=name) if name != key else entry
    return out


def _regex(pattern: str, option: str) -> re.Pattern[str]:
    try:
        return re.compile(pattern)
    except re.error as exc:
        raise UsageError(f"--{option} {pattern!r}: not a valid regular expression ({exc})") from None


# --- operations: what a plan file holds ---------------------------------------------------------


@dataclass(frozen=True)
class Operation:
    """One step of a plan: ``op`` names the function, ``args`` its JSON arguments."""

    op: str
    args: tuple[tuple[str, Any], ...] = ()

    @property
    def params(self) -> dict[str, Any]:
        return dict(self.args)

    @property
    def needs_target(self) -> bool:
        return self.op in _POLICIES or self.op in _DEPTH_OPS or (self.op in _VALUE_OPS and not _explicit(self))

    def describe(self) -> str:
        """The command-line spelling, as shown in the plan (a ``--map`` table by its size)."""
        if self.op == "map":
            return f"--map ({len(self.params['mapping'])} keys)"
        return " ".join(self.to_argv())

    def to_argv(self) -> list[str]:
        """The ``ckpt migrate`` flags that give this operation (``["--drop", "classifier.6"]``).

        A ``map`` operation holds its table, not a file name: it has no command-line form (save the
        plan and pass ``--plan``).
        """
        p = self.params
        flag = _FLAG_OF[self.op]
        if self.op == "map":
            if "file" in p:  # the file the table was read from, or is to be written to (ckpt diff --map-out)
                return [flag, p["file"]]
            raise UsageError("a --map table has no command-line form: save the plan and apply it with --plan")
        if self.op == "rename":
            return [flag, f"{p['pattern']}={p['replacement']}"]
        if self.op in _VALUE_OPS:
            return [flag, _value_op(self.op)[1](p)]
        value = next(iter(p.values()), None)
        return [flag] if value is None else [flag, str(value)]

    def to_json(self) -> dict[str, Any]:
        return {"op": self.op, **self.params}

    def apply(self, state: State, target: Target | None) -> State:
        p = self.params
        if self.op in _VALUE_OPS or self.op in _DEPTH_OPS:
            return _value_op(self.op)[2](state, target, p)
        if self.op in _POLICIES:
            if target is None:
                raise UsageError(f"{self.describe()} needs the target architecture (--arch)")
            return _POLICIES[self.op](state, target)
        if self.op == "rename":
            return rename(state, p["pattern"], p["replacement"])
        if self.op == "map":
            return map_keys(state, p["mapping"])
        return _SIMPLE[self.op](state, next(iter(p.values())))


_SIMPLE: dict[str, Callable[[State, str], State]] = {
    "strip_prefix": strip_prefix,
    "add_prefix": add_prefix,
    "drop": drop,
    "keep": keep,
    "exclude": exclude,
    "cast": cast,
}
_POLICIES: dict[str, Callable[[State, Target], State]] = {
    "fill_missing": fill_missing,
    "drop_unexpected": drop_unexpected,
    "reinit_mismatched": reinit_mismatched,
}
# op -> (field, type) it requires
_FIELDS: dict[str, tuple[tuple[str, type], ...]] = {
    "strip_prefix": (("prefix", str),),
    "add_prefix": (("prefix", str),),
    "drop": (("prefix", str),),
    "keep": (("pattern", str),),
    "exclude": (("pattern", str),),
    "cast": (("dtype", str),),
    "rename": (("pattern", str), ("replacement", str)),
    "map": (("mapping", dict),),
    "fill_missing": (),
    "drop_unexpected": (),
    "reinit_mismatched": (),
    "adapt_input_conv": (("module", str),),
    "resample_pos_embed": (("key", str),),
    "grow_blocks": (("policy", str),),
    "shrink_blocks": (("policy", str),),
}
# operations that change tensor values (ckpt_tool.adapt) or the number of blocks (ckpt_tool.depth),
# their optional fields, and their command-line values
_VALUE_OPS = ("adapt_input_conv", "resample_pos_embed")
_DEPTH_OPS = ("grow_blocks", "shrink_blocks")
_OPTIONAL: dict[str, tuple[tuple[str, type], ...]] = {
    "adapt_input_conv": (("in_chans", int),),
    "resample_pos_embed": (("grid", list), ("prefix_tokens", int)),
}


def _value_op(
    op: str,
) -> tuple[
    Callable[[str], dict[str, Any]],
    Callable[[dict[str, Any]], str],
    Callable[[State, Target | None, dict[str, Any]], State],
]:
    """(parse the flag's value, write it back, apply) of a value or depth operation."""
    from . import adapt, depth

    def policy(value: str) -> dict[str, Any]:
        return {"policy": value}

    table = {
        "adapt_input_conv": (adapt.parse_adapt_value, adapt.adapt_argv_value, adapt.apply_adapt),
        "resample_pos_embed": (adapt.parse_resample_value, adapt.resample_argv_value, adapt.apply_resample),
        "grow_blocks": (policy, lambda p: str(p["policy"]), depth.apply_grow),
        "shrink_blocks": (policy, lambda p: str(p["policy"]), depth.apply_shrink),
    }
    return table[op]


def _explicit(op: Operation) -> bool:
    """Whether a value operation names its size itself (``conv1=4``), so that it needs no target."""
    p = op.params
    return p.get("in_chans") is not None or p.get("grid") is not None


# --- argv: the one table between migrate's flags and operations ----------------------------------

# flag -> operation; each flag takes one value except the three policies
FLAGS: dict[str, str] = {
    "--drop": "drop",
    "--keep": "keep",
    "--exclude": "exclude",
    "--rename": "rename",
    "--strip-prefix": "strip_prefix",
    "--add-prefix": "add_prefix",
    "--map": "map",
    "--dtype": "cast",
    "--fill-missing": "fill_missing",
    "--drop-unexpected": "drop_unexpected",
    "--reinit-mismatched": "reinit_mismatched",
    "--adapt-input-conv": "adapt_input_conv",
    "--resample-pos-embed": "resample_pos_embed",
    "--grow-blocks": "grow_blocks",
    "--shrink-blocks": "shrink_blocks",
}
_FLAG_OF = {op: flag for flag, op in FLAGS.items()}


def operation_from_flag(flag: str, value: str | None = None) -> Operation:
    """One command-line operation as an :class:`Operation`: ``("--drop", "fc")``, ``("--fill-missing", None)``.

    ``--map`` takes the JSON file of old key -> new key; ``--rename`` takes ``REGEX=REPLACEMENT``.
    """
    op = FLAGS.get(flag)
    if op is None:
        raise UsageError(f"{flag}: not an operation (known: {', '.join(FLAGS)})")
    fields = _FIELDS[op]
    if not fields:
        if value is not None:
            raise UsageError(f"{flag} takes no value")
        return operation(op)
    if value is None:
        raise UsageError(f"{flag} needs a value")
    if op == "rename":
        return parse_rename(value)
    if op == "map":
        return load_mapping(value)
    if op in _VALUE_OPS or op in _DEPTH_OPS:
        return operation(op, **_value_op(op)[0](value))
    return operation(op, **{fields[0][0]: value})


def operations_from_argv(pairs: list[tuple[str, str | None]]) -> list[Operation]:
    """``[("--strip-prefix", "module."), ("--fill-missing", None)]`` -> operations, in that order."""
    return [operation_from_flag(flag, value) for flag, value in pairs]


def operation(op: str, **params: Any) -> Operation:
    """Build and check one operation: ``operation("drop", prefix="classifier.6")``."""
    fields = _FIELDS.get(op)
    if fields is None:
        raise UsageError(f"unknown operation {op!r} (known: {', '.join(sorted(_FIELDS))})")
    args = []
    for name, kind in fields:
        value = params.get(name)
        if not isinstance(value, kind):
            raise UsageError(f"operation {op!r} needs {name!r} as a {kind.__name__}, got {value!r}")
        if kind is str and name != "replacement" and not value:
            raise UsageError(f"operation {op!r} needs a non-empty {name!r}")
        args.append((name, value))
    for name, kind in _OPTIONAL.get(op, ()):
        value = params.get(name)
        if value is not None:
            if not isinstance(value, kind) or isinstance(value, bool):
                raise UsageError(f"operation {op!r} needs {name!r} as a {kind.__name__}, got {value!r}")
            args.append((name, value))
    if op == "resample_pos_embed":
        from .adapt import check_resample

        check_resample(params)
    if op == "adapt_input_conv" and params.get("in_chans") is not None and params["in_chans"] < 1:
        raise UsageError(f"operation 'adapt_input_conv' needs 'in_chans' >= 1, got {params['in_chans']!r}")
    if op in _DEPTH_OPS:
        from .depth import GROW_POLICIES, SHRINK_POLICIES

        choices = GROW_POLICIES if op == "grow_blocks" else SHRINK_POLICIES
        if params["policy"] not in choices:
            raise UsageError(f"{_FLAG_OF[op]} {params['policy']}: choose one of {', '.join(choices)}")
    if op == "map" and not all(isinstance(k, str) and isinstance(v, str) for k, v in params["mapping"].items()):
        raise UsageError("operation 'map' needs a mapping of key strings to key strings")
    if op == "map" and isinstance(params.get("file"), str) and params["file"]:
        args.append(("file", params["file"]))  # optional: where the table lives, for the command-line form
    if op in ("keep", "exclude", "rename"):
        _regex(params["pattern"], op)
    if op == "cast" and params["dtype"] not in CAST_DTYPES:
        raise UsageError(f"--dtype {params['dtype']}: choose one of {', '.join(CAST_DTYPES)}")
    return Operation(op, tuple(args))


def parse_rename(text: str) -> Operation:
    """``'^fc\\.=head.'`` -> a rename operation (split at the last ``=``: patterns may hold ``(?=``)."""
    pattern, sep, replacement = text.rpartition("=")
    if not sep or not pattern:
        raise UsageError(f"--rename {text!r} is not REGEX=REPLACEMENT")
    return operation("rename", pattern=pattern, replacement=replacement)


def load_mapping(path: str) -> Operation:
    """A ``--map FILE``: a JSON object of old key -> new key."""
    data = _read_json(path, "--map")
    if not isinstance(data, dict):
        raise InputError(f"{path}: --map file must hold a JSON object of old key -> new key")
    return operation("map", mapping=data, file=path)


def save_mapping(mapping: Mapping[str, str], path: str) -> None:
    """Write a ``--map`` file (a JSON object of old key -> new key), atomically."""
    _save_json(dict(mapping), path)


# --- plans ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Plan:
    """What to do to which checkpoint, and for which target: the one owner of the plan's JSON and argv forms.

    Example:
        >>> plan = Plan("dp.pth", arch="resnet18", operations=(operation("strip_prefix", prefix="module."),))
        >>> plan.command("out.pth")
        'ckpt migrate dp.pth --arch resnet18 --strip-prefix module. -o out.pth'
        >>> Plan.from_json(plan.to_json()) == plan
        True
    """

    source: str | None = None
    key: str | None = None
    arch: str | None = None
    arch_args: dict[str, Any] = field(default_factory=dict)
    operations: tuple[Operation, ...] = ()
    # training state (ckpt_tool.optim_state): the trained model, for the optimizer's parameter ids;
    # leave optimizer state out; sibling state dicts (EMA) given the same operations
    source_arch: str | None = None
    drop_optimizer: bool = False
    also_keys: tuple[str, ...] = ()

    def to_json(self) -> dict[str, Any]:
        return {
            "version": PLAN_VERSION,
            "source": self.source,
            "key": self.key,
            "arch": self.arch,
            "arch_args": dict(self.arch_args),
            "operations": [op.to_json() for op in self.operations],
            **self._training_json(),
        }

    def _training_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        if self.source_arch:
            out["source_arch"] = self.source_arch
        if self.drop_optimizer:
            out["drop_optimizer"] = True
        if self.also_keys:
            out["also_keys"] = list(self.also_keys)
        return out

    @classmethod
    def from_json(cls, data: Any, where: str = "plan") -> Plan:
        """Check and build a plan from its JSON form (unknown fields of an operation are ignored)."""
        return plan_from_json(data, where)

    @classmethod
    def load(cls, path: str) -> Plan:
        """Read a plan file (see :func:`load_plan`)."""
        return load_plan(path)

    def save(self, path: str) -> None:
        """Write the plan as JSON, atomically: ``path`` holds the old file or the new one, never half of one."""
        _save_json(self.to_json(), path)

    def to_argv(self, output: str | None = None) -> list[str]:
        """The ``ckpt migrate`` command line (as a list) that applies this plan, flag for flag."""
        if self.source is None:
            raise UsageError("the plan names no source checkpoint")
        argv = ["ckpt", "migrate", self.source]
        if self.key:
            argv += ["--key", self.key]
        if self.arch:
            argv += ["--arch", self.arch]
            for name, value in sorted(self.arch_args.items()):
                argv += ["--arch-arg", f"{name}={_arch_value(value)}"]
        for op in self.operations:
            argv += op.to_argv()
        argv += ["--source-arch", self.source_arch] if self.source_arch else []
        argv += ["--drop-optimizer"] if self.drop_optimizer else []
        for k in self.also_keys:
            argv += ["--also-key", k]
        return [*argv, "-o", output or fixed_name(self.source)]

    def command(self, output: str | None = None) -> str:
        """:meth:`to_argv` as one shell-quoted line."""
        return " ".join(shlex.quote(a) for a in self.to_argv(output))


def _arch_value(value: Any) -> str:
    """How to write an --arch-arg value so that ``parse_arch_args`` reads it back as the same value."""
    from .arch import parse_arch_args

    if isinstance(value, str):
        return value if parse_arch_args([f"x={value}"])["x"] == value else repr(value)
    return repr(value)


def fixed_name(source: str) -> str:
    """The output name a suggested command uses: ``a.pth`` -> ``a.fixed.pth``."""
    base = source[: -len(".index.json")] if source.endswith(".index.json") else source.rstrip("/")
    stem, ext = os.path.splitext(base)
    return f"{stem}.fixed{ext if ext in ('.pth', '.pt', '.bin', '.ckpt', '.safetensors') else '.pth'}"


def plan_from_json(data: Any, where: str = "plan") -> Plan:
    """Check and build a :class:`Plan` from its JSON form (unknown fields of an operation are ignored)."""
    if not isinstance(data, dict):
        raise InputError(f"{where}: a plan must be a JSON object")
    version = data.get("version", PLAN_VERSION)
    if version != PLAN_VERSION:
        raise InputError(f"{where}: plan version {version!r} is not supported (this ckpt reads version {PLAN_VERSION})")
    ops = data.get("operations", [])
    if not isinstance(ops, list):
        raise InputError(f"{where}: 'operations' must be a list")
    operations = []
    for i, item in enumerate(ops):
        if not isinstance(item, dict) or not isinstance(item.get("op"), str):
            raise InputError(f"{where}: operation {i} is not an object with an 'op'")
        try:
            operations.append(operation(item["op"], **{k: v for k, v in item.items() if k != "op"}))
        except UsageError as exc:
            raise InputError(f"{where}: operation {i}: {exc}") from None
    arch_args = data.get("arch_args") or {}
    for name in ("source", "key", "arch"):
        if data.get(name) is not None and not isinstance(data[name], str):
            raise InputError(f"{where}: {name!r} must be a string or null")
    if not isinstance(arch_args, dict):
        raise InputError(f"{where}: 'arch_args' must be an object")
    return Plan(
        data.get("source"),
        data.get("key"),
        data.get("arch"),
        arch_args,
        tuple(operations),
        **_training_from_json(data, where),
    )


def _training_from_json(data: dict[str, Any], where: str) -> dict[str, Any]:
    """The plan's optional training-state fields (``source_arch``, ``drop_optimizer``, ``also_keys``)."""
    source_arch, drop, also = data.get("source_arch"), data.get("drop_optimizer", False), data.get("also_keys", [])
    if source_arch is not None and not isinstance(source_arch, str):
        raise InputError(f"{where}: 'source_arch' must be a string or null")
    if not isinstance(drop, bool):
        raise InputError(f"{where}: 'drop_optimizer' must be true or false")
    if not isinstance(also, list) or not all(isinstance(k, str) and k for k in also):
        raise InputError(f"{where}: 'also_keys' must be a list of key paths")
    return {"source_arch": source_arch, "drop_optimizer": drop, "also_keys": tuple(also)}


def load_plan(path: str) -> Plan:
    """Read a plan file (as written by ``ckpt diff --plan-out`` or :meth:`Plan.save`).

    A relative ``source`` is taken from the current directory, or else from the plan's own.
    """
    plan = plan_from_json(_read_json(path, "--plan"), path)
    if plan.source and not os.path.isabs(plan.source) and not os.path.exists(plan.source):
        beside = os.path.join(os.path.dirname(path), plan.source)
        if os.path.exists(beside):
            plan = replace(plan, source=beside)
    return plan


def save_plan(plan: Plan, path: str) -> None:
    """:meth:`Plan.save`."""
    plan.save(path)


def _save_json(data: Any, path: str) -> None:
    from .writer import Staging

    staging = Staging()
    try:
        with staging.open(path) as f:
            f.write((json.dumps(data, indent=2) + "\n").encode("utf-8"))
        staging.commit()
    finally:
        staging.abort()


def _read_json(path: str, option: str) -> Any:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except FileNotFoundError:
        raise InputError(f"{path}: no such file ({option})") from None
    except OSError as exc:
        raise InputError(f"{path}: cannot be read ({exc.strerror or exc})") from None
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise InputError(f"{path}: not valid JSON ({exc})") from None


# --- applying ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Step:
    """What one operation did: the keys it dropped, renamed (``old -> new``), added, reinitialised or cast,
    and those whose values it changed in place (``adapted``: an input conv, a position embedding)."""

    operation: str
    dropped: tuple[str, ...] = ()
    renamed: tuple[tuple[str, str], ...] = ()
    added: tuple[str, ...] = ()
    reinitialised: tuple[str, ...] = ()
    cast: tuple[str, ...] = ()
    adapted: tuple[str, ...] = ()
    # the operation names keys and was checked to match some (an identity ``--rename`` changes nothing)
    matched: bool = field(default=False, repr=False)

    @property
    def affected(self) -> int:
        return (
            len(self.dropped)
            + len(self.renamed)
            + len(self.added)
            + len(self.reinitialised)
            + len(self.cast)
            + len(self.adapted)
        )


@dataclass(frozen=True)
class Applied:
    state: State
    steps: tuple[Step, ...]


def initial_state(tensors: Mapping[str, TensorRef]) -> State:
    """The state a checkpoint's tensors describe, before any operation."""
    return {k: Entry.from_ref(ref) for k, ref in tensors.items()}


def apply(
    operations: tuple[Operation, ...] | list[Operation],
    state: State,
    target: Target | None = None,
    objects: tuple[str, ...] = (),
) -> Applied:
    """Run the operations in order. Returns the final state and, per operation, what it changed.

    Example:
        >>> from ckpt_tool import open_checkpoint
        >>> ckpt = open_checkpoint("checkpoint.pth")
        >>> applied = apply([operation("strip_prefix", prefix="module.")], initial_state(ckpt.tensors))
        >>> applied.steps[0].renamed[0]
        ('module.features.0.weight', 'features.0.weight')
    """
    steps = []
    # keys of non-tensor entries (``_extra_state``): the same operations rename and drop them (the
    # writer carries them), so an operation that matches only them matches something
    others: State = {k: Entry(k, "float32", (), CHECKPOINT, k, "float32") for k in objects}
    for op in operations:
        matched = _refuse_if_unmatched(op, {**state, **others})
        after = op.apply(state, target)
        others_after = others if op.needs_target else op.apply(others, target)
        # the step lists the entries it drops or renames too, not only the tensors
        step = _step(op.describe(), {**state, **others}, {**after, **others_after})
        steps.append(replace(step, matched=True) if matched else step)
        state, others = after, others_after
    return Applied(state, tuple(steps))


def _refuse_if_unmatched(op: Operation, state: State) -> bool:
    """An operation on keys that finds none is a typo or the wrong file: refuse it, naming the nearest keys.

    Returns whether the operation names keys (and so matched some); ``False`` for the others.
    """
    import difflib

    p = op.params
    keys = list(state)
    if op.op == "drop":
        hit = any(in_module(k, p["prefix"]) for k in keys)
        what, candidates = p["prefix"], _modules(keys)
    elif op.op in ("keep", "exclude", "rename"):
        rx = _regex(p["pattern"], op.op)
        hit = any(rx.search(k) for k in keys)
        what, candidates = p["pattern"], keys
    elif op.op == "strip_prefix":
        hit = any(k.startswith(p["prefix"]) for k in keys)
        what, candidates = p["prefix"], sorted({m + "." for m in _modules(keys)})
    elif op.op == "map":
        hit = any(k in p["mapping"] for k in keys)
        what, candidates = next(iter(p["mapping"]), ""), keys
    elif op.op in _VALUE_OPS:
        what = f"{p['module']}.weight" if op.op == "adapt_input_conv" else p["key"]
        hit, candidates = what in keys, keys
    else:
        return False
    if hit:
        return True
    near = difflib.get_close_matches(what, candidates, n=3, cutoff=0.5)
    hint = f"closest: {', '.join(near)}" if near else f"keys look like {', '.join(keys[:3])}"
    raise UsageError(f"{op.describe()} matches no key ({hint})")


def _modules(keys: list[str]) -> list[str]:
    """Every module path of the keys, outermost first: ``a.b.w`` gives ``a``, ``a.b``."""
    out: dict[str, None] = {}
    for k in keys:
        parts = k.split(".")
        for i in range(1, len(parts)):
            out[".".join(parts[:i])] = None
    return list(out)


def _step(name: str, before: State, after: State) -> Step:
    # entries are matched by where their values come from, so a rename is told from a drop + add
    where_after = {(e.source, e.origin, e.transform): k for k, e in after.items() if not e.tied_to}
    dropped, renamed, cast_keys = [], [], []
    for key, e in before.items():
        if e.tied_to:
            continue  # an alias follows its partner
        new = where_after.get((e.source, e.origin, e.transform))
        if new is None:
            dropped.append(key)
            continue
        if new != key:
            renamed.append((key, new))
        if after[new].dtype != e.dtype:
            cast_keys.append(new)
    where_before = {(e.source, e.origin, e.transform) for e in before.values() if not e.tied_to}
    fresh = [
        k
        for k, e in after.items()
        if (e.source, e.origin, e.transform) not in where_before or (e.tied_to and k not in before)
    ]
    # a key whose values an operation computed anew, under its old name
    adapted = [k for k in fresh if after[k].transform and k in before]
    reinit = [k for k in fresh if after[k].reason == "reinit_mismatched"]
    added = [k for k in fresh if after[k].reason != "reinit_mismatched" and k not in adapted]
    # a reinitialised or adapted key replaces the checkpoint's tensor of the same name: not a drop
    dropped = [k for k in dropped if k not in reinit and k not in adapted]
    return Step(name, tuple(dropped), tuple(renamed), tuple(added), tuple(reinit), tuple(cast_keys), tuple(adapted))
