"""``migrate``: apply a plan to a checkpoint, write the result streamed and atomically, verify it.

Where operations only move tensors (drop, keep, rename, prefixes, format conversion) their bytes go
from the input file to the output in bounded chunks (or by an in-kernel copy) and torch is never
imported. Casts convert chunk by chunk; values for ``fill_missing``/``reinit_mismatched`` come from
the target model built on the CPU with ``seed``; with an architecture the result is loaded into it
with ``strict=True`` afterwards.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field, fields, replace
from typing import Any

from . import __version__
from .adapt import computed_chunks, needs_torch
from .arch import target_signature
from .checkpoint import Checkpoint, Progress, TensorRef, contiguous_strides, is_floating, itemsize, numel
from .compat import (
    ALL_CURRENT,
    MOSTLY_NEW_SHARE,
    Compatibility,
    check,
    checkpoint_aliases,
    module_versions,
    parameter_share,
)
from .dcp_writer import check_dcp_output, write_dcp
from .diff.shapeflow import ShapeFlow, shape_flow
from .errors import FormatError, UsageError
from .formats.dcp import FORMAT as DCP
from .formats.dcp import chunks_of
from .formats.hf_trainer import is_trainer_dir
from .formats.pickle_vm import GlobalRef, PickledTensor, Placeholder
from .objects import account, composite_views, is_composite
from .optim_state import CARRIED, AlsoPlan, Carried, OptimizerPlan, training_state, verify_carried
from .optim_state.trainer import TrainerPlan
from .plan import CHECKPOINT, Applied, Entry, Plan, State, Step, apply, initial_state
from .reader import open_checkpoint, sibling_entries
from .torch_extra import require_torch
from .values import CHUNK_BYTES, FileCache, iter_raw_chunks, to_numpy
from .verify import VERIFY_CHUNK_BYTES, Verification, verify_output
from .writer import (
    PTH,
    SAFETENSORS,
    Blob,
    Deferred,
    Layout,
    Metadata,
    Nesting,
    Staging,
    View,
    Written,
    check_output,
    output_format,
)
from .writer import write_checkpoint as _write

CAST_CHUNK_BYTES = 4 * 1024 * 1024

# --- reports --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Shared:
    """Tensors that share one storage in the input, and how the output keeps them.

    ``how``: ``"one storage"`` (.pth: written once, views of it), ``"alias"`` (safetensors: written
    once under ``written_as``, the other names recorded in the metadata) or ``"copies"`` (safetensors:
    different views of one storage, each written as its own tensor).
    """

    keys: tuple[str, ...]
    written_as: str
    how: str


@dataclass(frozen=True)
class Initialised:
    key: str
    reason: str
    shape: tuple[int, ...]


@dataclass(frozen=True)
class Adapted:
    """A tensor written with values computed from ``origin`` (``how``): an adapted conv, a copied block."""

    key: str
    origin: str
    origin_shape: tuple[int, ...]
    shape: tuple[int, ...]
    how: str


def adapted_entries(state: State) -> tuple[Adapted, ...]:
    return tuple(
        Adapted(k, e.origin, e.ref.shape if e.ref is not None else e.shape, e.shape, e.reason)
        for k, e in state.items()
        if e.transform and e.ref is not None
    )


@dataclass(frozen=True)
class MigrationPlan:
    """Everything decided before a byte is written: shown first, and all a ``--dry-run`` does."""

    source: str
    source_format: str
    state_path: str | None
    output: str | None
    output_format: str | None
    files: tuple[str, ...]
    arch: str | None
    operations: tuple[dict[str, Any], ...]
    steps: tuple[Step, ...]
    tensors: int
    tensor_bytes: int
    initialised: tuple[Initialised, ...]
    shared: tuple[Shared, ...]
    extras_kept: tuple[str, ...]
    extras_dropped: dict[str, str]
    diff: Compatibility | None  # what load_state_dict(strict=True) would reject: the one engine's answer
    streamed: bool  # bytes only move: no value changes, no torch
    notes: tuple[str, ...] = ()  # how input objects were converted or why something is not carried
    checkpoint_share: float | None = None  # of the target's parameter elements, with an architecture
    adapted: tuple[Adapted, ...] = ()  # tensors whose values are computed from a source tensor
    shape_flow: ShapeFlow | None = None  # --dry-run with an architecture: its forward on the meta device
    optimizers: tuple[OptimizerPlan, ...] = ()  # what happens to each optimizer state (optim_state)
    also: tuple[AlsoPlan, ...] = ()  # sibling state dicts (--also-key) given the same operations
    trainer: TrainerPlan | None = None  # a Hugging Face Trainer checkpoint directory: its other files


@dataclass(frozen=True)
class MigrateReport:
    plan: MigrationPlan
    dry_run: bool
    written: Written | None = None
    verification: Verification | None = None
    nonfinite: tuple[str, ...] = ()
    source_sha256: str | None = None

    @property
    def ok(self) -> bool:
        """False when the output does not load strictly into the target or holds NaN/Inf (exit 1)."""
        if self.nonfinite:
            return False
        if self.verification is not None:
            return self.verification.ok
        if self.plan.shape_flow is not None and self.plan.shape_flow.fails:
            return False
        return self.plan.diff is None or self.plan.diff.loads

    def to_json(self) -> dict[str, Any]:
        # the renderer turns the values (dataclasses) into JSON data
        return {"ok": self.ok, **{f.name: getattr(self, f.name) for f in fields(self)}}


# --- the entry points -----------------------------------------------------------------------------


def migrate(
    plan: Plan,
    output: str | None = None,
    *,
    seed: int = 0,
    keep_extras: bool = False,
    max_shard_size: int | None = None,
    force: bool = False,
    in_place: bool = False,
    dry_run: bool = False,
    allow_mostly_new: bool = False,
    on_plan: Callable[[MigrationPlan], None] | None = None,
    progress: Progress | None = None,
    dequantize: bool = False,
    densify: bool = False,
    to: str | None = None,
    input_shape: tuple[int, ...] | None = None,
) -> MigrateReport:
    """Apply ``plan`` to its source checkpoint and write the result to ``output``.

    Args:
        plan: source, ``--key``, target architecture and the operations, in order.
        output: ``.safetensors`` or ``.pth``/``.pt``/``.bin``; ``None`` with ``in_place`` (the source)
            or ``dry_run``.
        seed: seeds ``torch.manual_seed`` before the target is built for initial values.
        keep_extras: keep plain-data top-level entries (``epoch``): in the ``.pth`` beside the state
            dict, in the safetensors metadata as JSON. A training checkpoint written to one
            ``.pth`` is carried whole, its optimizer state re-keyed (see :mod:`ckpt_tool.optim_state`).
        max_shard_size: write Hugging Face style shards of at most this many bytes.
        force: replace an existing output. ``in_place``: replace the source, keeping ``SOURCE.bak``.
        dry_run: plan only; nothing is written.
        allow_mostly_new: write even when under half of the target's parameters come from the
            checkpoint (otherwise refused as the wrong architecture).
        on_plan: called with the plan before anything is written (the CLI shows it).
        progress: called with ``(bytes written now, tensor bytes in all)`` as tensors stream.
        dequantize: write quantized tensors as float32; densify: write sparse tensors dense (else
            a .safetensors output refuses them; a .pth carries them as they are).
        to: ``"dcp"`` writes ``output`` as a torch.distributed.checkpoint directory (imports torch);
            by default the format follows the output's extension.
        input_shape: with ``dry_run`` and an architecture, the dummy input of the shape flow (the
            target's forward on the meta device with the planned shapes); its default input without it.

    Returns:
        A :class:`MigrateReport`; ``report.ok`` is False when the result does not load strictly into
        the target, holds NaN/Inf, or is not value for value what the plan intended (the output is
        re-read and compared with its sources; with an architecture it is also loaded into it).

    Example:
        >>> from ckpt_tool.plan import Plan, operation
        >>> ops = (operation("strip_prefix", prefix="module."),)
        >>> plan = Plan("checkpoint.pth", key="model_state_dict", arch="my_models.py:tiny_cnn", operations=ops)
        >>> report = migrate(plan, "tiny_cnn.safetensors")
        >>> report.verification.loads, report.written.tensors
        (True, 18)
    """
    if plan.source is None:
        raise UsageError("no checkpoint given (pass it, or use a --plan whose 'source' names one)")
    if is_trainer_dir(plan.source):  # checkpoint-500/: a directory of training files, written as one
        from .optim_state.trainer import migrate_trainer

        return migrate_trainer(
            plan,
            output,
            seed=seed,
            force=force,
            dry_run=dry_run,
            on_plan=on_plan,
            progress=progress,
            refused={"--in-place": in_place, "--max-shard-size": max_shard_size, "--format": to},
            allow_mostly_new=allow_mostly_new,
            keep_extras=keep_extras,
            dequantize=dequantize,
            densify=densify,
            input_shape=input_shape,
        )
    if input_shape is not None and not (dry_run and plan.arch):
        raise UsageError("--input-shape sets the shape flow's input: it needs --dry-run and --arch")
    ckpt = open_checkpoint(plan.source, plan.key)
    if isinstance(ckpt.root, PickledTensor):
        raise UsageError(
            f"{plan.source}: holds one bare tensor, not a state dict (torch.load returns the tensor "
            "itself): nothing to migrate or convert"
        )
    if not ckpt.tensors:
        raise UsageError(
            f"{plan.source}: holds no tensors to migrate (try --key; candidates: "
            f"{', '.join(repr(c.path) for c in ckpt.candidates) or 'none'})"
        )
    if in_place:
        if len(ckpt.files) != 1 or output not in (None, plan.source):
            raise UsageError("--in-place rewrites a single-file input and takes no other -o")
        output = plan.source
    if output is None and not dry_run:
        raise UsageError("no output given: pass -o OUT (or --dry-run, or --in-place)")
    fmt = (DCP if to == DCP else output_format(output)) if output is not None else None
    if fmt == DCP and max_shard_size:
        raise UsageError("--max-shard-size writes Hugging Face shards; a DCP output is one directory")
    # the digest goes into safetensors headers and shard indexes (a single .pth has no place for
    # it); started now, it runs while the plan is made and the bytes are copied
    hasher = _Hasher(ckpt) if not dry_run and (fmt == SAFETENSORS or max_shard_size) else None
    needy = [op.describe() for op in plan.operations if op.needs_target]
    if needy and plan.arch is None:
        raise UsageError(f"{', '.join(dict.fromkeys(needy))}: these operations need the target (--arch)")
    signature = target_signature(plan.arch, plan.arch_args) if plan.arch else None
    applied = apply(plan.operations, _source_state(ckpt), signature, objects=tuple(ckpt.objects))
    if not applied.state:
        raise UsageError(f"{plan.source}: the operations leave no tensors to write")
    # every input object: carried, converted with a note, or refused here, before anything is written
    accounted = account(
        ckpt,
        plan.operations,
        applied.state,
        fmt or PTH,
        dequantize=dequantize,
        densify=densify,
        sharded=max_shard_size is not None and fmt == PTH,
    )
    applied = replace(applied, state=accounted.state)
    for e in applied.state.values():
        if (
            e.ref is not None
            and e.ref.offset is None
            and e.ref.numel
            and not is_composite(e)
            and chunks_of(e.ref) is None
        ):  # a DCP tensor of several chunks is read chunk by chunk
            raise FormatError(
                f"{plan.source}: tensor {e.origin!r} has no stored bytes (a meta tensor or a compressed "
                "entry); leave it out with --drop or --exclude"
            )

    carried = training_state(ckpt, plan, applied.state, signature, fmt or PTH, sharded=max_shard_size is not None)
    kept, dropped = (
        _extras(ckpt, keep_extras, plan.drop_optimizer) if carried is None else (carried.extras, carried.dropped)
    )
    values = _TargetValues(plan, seed)
    check_all = plan.arch is not None
    built = _layout({**applied.state, **(carried.state if carried else {})}, fmt or SAFETENSORS, values, check_all)
    built.layout = replace(built.layout, objects=accounted.objects, module_metadata=accounted.module_metadata)
    files: tuple[str, ...] = ()
    backup = None
    if output is not None:
        files = (output,) if fmt == DCP else tuple(_planned_files(output, built.layout, max_shard_size))
        for name in files if fmt != DCP else ():
            backup = check_output(name, list(ckpt.files) + [ckpt.path], force=force, in_place=in_place) or backup
        if fmt == DCP:
            check_dcp_output(output, list(ckpt.files) + [ckpt.path], force=force)
    share = (
        parameter_share(signature, [k for k, e in applied.state.items() if e.from_checkpoint]) if signature else None
    )
    planned = MigrationPlan(
        source=plan.source,
        source_format=ckpt.format,
        state_path=ckpt.state_path,
        output=output,
        output_format=fmt,
        files=files,
        arch=plan.arch,
        operations=tuple(op.to_json() for op in plan.operations),
        steps=applied.steps,
        tensors=len(applied.state),
        tensor_bytes=sum(_nbytes(e) for e in applied.state.values()),
        initialised=tuple(
            Initialised(k, e.reason, e.shape) for k, e in applied.state.items() if e.source != CHECKPOINT
        ),
        shared=built.shared,
        extras_kept=tuple(kept),
        extras_dropped=dropped,
        diff=check(
            {**applied.state, **dict(accounted.objects)},
            signature,
            versions=_output_versions(ckpt, applied.state, fmt),
            objects=[k for k, _ in accounted.objects],
        )
        if signature
        else None,
        streamed=all(
            e.source == CHECKPOINT and e.dtype == e.source_dtype and not e.transform for e in applied.state.values()
        ),
        notes=tuple(accounted.notes),
        checkpoint_share=round(share, 6) if share is not None else None,
        adapted=adapted_entries(applied.state),
        shape_flow=shape_flow(signature, state={k: e.shape for k, e in applied.state.items()}, input_shape=input_shape)
        if signature is not None and dry_run
        else None,
        optimizers=carried.optimizers if carried else (),
        also=carried.also if carried else (),
    )
    if planned.initialised and not dry_run:
        require_torch(f"initialising {len(planned.initialised)} keys from --arch {plan.arch}")
    if any(needs_torch(e) for e in applied.state.values()) and not dry_run:
        require_torch("computing adapted tensors (--adapt-input-conv, --resample-pos-embed)")
    if on_plan is not None:
        on_plan(planned)
    if share is not None and share < MOSTLY_NEW_SHARE and not allow_mostly_new:
        values.release()
        built.files.close()
        raise UsageError(
            f"only {share:.0%} of {plan.arch}'s parameters would come from {plan.source}: it is "
            "probably not a checkpoint of this architecture (check --arch; --allow-mostly-new "
            "writes it anyway)"
        )
    if dry_run or output is None:
        accounted.close()
        return MigrateReport(planned, dry_run=True)

    metadata = _metadata(ckpt, plan, applied, built.aliases, kept if carried is None else {}, hasher)
    # a .pth keeps extras beside the state dict, under its original key (or "state_dict")
    nesting = (
        Nesting(ckpt.state_path or "state_dict", kept, frozenset(carried.state) if carried else frozenset())
        if fmt == PTH and kept
        else Nesting()
    )
    verified: list[Verification] = []

    def verify(staged: Written) -> bool:
        # the staged files are verified while their fsyncs and the source's sha256 run; only then
        # are they renamed into place, and only if every value is what the plan intended
        v = verify_output(
            staged,
            applied.state,
            target_chunks=values.chunks,
            cast=cast_bytes,
            aliases=built.aliases,
            state_path=nesting.path,
            signature=signature,
            seed=seed,
            computed=lambda e: computed_chunks(e, built.files, VERIFY_CHUNK_BYTES),
            objects=accounted.objects,
            module_metadata=accounted.module_metadata,
            # the training state beside the state dict is re-read by its own check (_with_carried)
            extras=nesting.extras if carried is None else None,
        )
        verified.append(_with_carried(v, staged, carried, values) if carried is not None else v)
        return not verified[-1].differ

    try:
        written = (write_dcp if fmt == DCP else _write)(
            output,
            built.layout,
            metadata=metadata,
            nesting=nesting,
            max_shard_size=max_shard_size,
            backup=backup,
            staging=Staging(),
            progress=progress,
            before_commit=verify,
            inputs=[*ckpt.files, ckpt.path],
        )
        verification = verified[0]
        if carried is not None:
            # Written counts the state dict's tensors; the training state beside it is the plan's
            written = replace(
                written,
                tensors=written.tensors - len(carried.state),
                tensor_bytes=written.tensor_bytes - sum(_nbytes(e) for e in carried.state.values()),
            )
    finally:
        values.release()
        built.files.close()
        accounted.close()  # converted values stay readable until the output is verified
    return MigrateReport(
        planned, False, written, verification, tuple(built.nonfinite), hasher.hexdigest() if hasher else None
    )


def _with_carried(
    verification: Verification, written: Written, carried: Carried, values: _TargetValues
) -> Verification:
    """The re-read of the training state beside the state dict, folded into the verification."""
    differ, checked = verify_carried(written, carried, target_chunks=values.chunks, cast=cast_bytes)
    return replace(verification, differ=verification.differ + tuple(differ), checked=verification.checked + checked)


def write_training_file(carried: Carried, output: str, whole: str) -> tuple[Written, list[str], int]:
    """Write ``carried.extras[whole]`` as a whole ``.pth`` (a Trainer's ``optimizer.pt``), staged and
    re-read before it is renamed into place. Returns (written, what differs, tensors compared)."""
    values = _TargetValues(Plan(None), 0)
    built = _layout(carried.state, PTH, values, False)
    nesting = Nesting(None, carried.extras[whole], frozenset(carried.state), bare=True)
    found: list[tuple[list[str], int]] = []

    def verify(staged: Written) -> bool:
        found.append(verify_carried(staged, carried, target_chunks=values.chunks, cast=cast_bytes, whole=whole))
        return not found[-1][0]  # not what was planned: never renamed into place

    try:
        written = _write(output, built.layout, nesting=nesting, staging=Staging(), before_commit=verify)
    finally:
        built.files.close()
    return written, *found[0]


def convert(
    source: str,
    output: str,
    *,
    force: bool = False,
    max_shard_size: int | None = None,
    key: str | None = None,
    progress: Progress | None = None,
    dequantize: bool = False,
    densify: bool = False,
    on_plan: Callable[[MigrationPlan], None] | None = None,
    to: str | None = None,
) -> MigrateReport:
    """Rewrite a checkpoint in another format (``.pth`` -> ``.safetensors``, ...) with identical tensors."""
    return migrate(
        Plan(source, key),
        output,
        force=force,
        max_shard_size=max_shard_size,
        progress=progress,
        dequantize=dequantize,
        densify=densify,
        on_plan=on_plan,
        to=to,
    )


def _output_versions(ckpt: Checkpoint, state: State, fmt: str | None) -> Mapping[str, int | None] | None:
    """The module versions the output's ``_metadata`` gives torch (they decide its num_batches_tracked fill-ins).

    A safetensors output carries none; a ``.pth`` (and a dry run without an output) carries the input's,
    renamed with its keys.
    """
    if fmt == SAFETENSORS:
        return None
    versions = module_versions(ckpt)
    if versions is None or versions is ALL_CURRENT:
        return versions
    return {
        k.rpartition(".")[0]: versions.get(e.origin.rpartition(".")[0]) for k, e in state.items() if e.from_checkpoint
    }


# --- extras and metadata --------------------------------------------------------------------------


class _NotPlain(Exception):
    pass


def _plain(value: Any) -> Any:
    """``value`` as JSON data, or :class:`_NotPlain`."""
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        if value != value or value in (float("inf"), float("-inf")):
            raise _NotPlain("not finite")
        return value
    if isinstance(value, tuple):  # kept a tuple: torch.load gives set_extra_state the tuple it was saved with
        return tuple(_plain(v) for v in value)
    if isinstance(value, list):
        return [_plain(v) for v in value]
    if isinstance(value, dict) and all(isinstance(k, str) for k in value):
        return {k: _plain(v) for k, v in value.items()}
    raise _NotPlain(type(value).__name__)


def _why_not_plain(value: Any) -> str:
    if isinstance(value, PickledTensor):
        return "a tensor"
    if isinstance(value, Placeholder):
        return f"an object ({value.name})"
    if isinstance(value, GlobalRef):
        return f"a reference to {value.qualname}"
    return "holds tensors or objects" if isinstance(value, (dict, list, tuple)) else "not plain data"


def _string_metadata(ckpt: Checkpoint) -> bool:
    """Whether the source's extras are string metadata: a safetensors header's, or a sharded index's."""
    return ckpt.format == SAFETENSORS or ckpt.format.startswith("sharded")


def _extras(ckpt: Checkpoint, keep: bool, drop_optimizer: bool = False) -> tuple[dict[str, Any], dict[str, str]]:
    """Entries beside the state dict (at every level of its path): (kept as plain data, dropped -> why)."""
    if _string_metadata(ckpt):
        # our own provenance is written afresh; "format" is always written, a set's "total_size" recounted
        meta = {
            k: v for k, v in ckpt.metadata.items() if not k.startswith("ckpt.") and k not in ("format", "total_size")
        }
        return (meta, {}) if keep else ({}, {k: "--keep-extras keeps it" for k in meta})
    kept: dict[str, Any] = {}
    dropped: dict[str, str] = {}
    # siblings at every level of the state dict's path: chgnet's model/model_args beside model/state_dict
    for name, value in sibling_entries(ckpt.root, ckpt.state_path):
        if isinstance(value, dict) and "param_groups" in value and "state" in value:
            # carried by optim_state into a single .pth; here the output has no place for it
            dropped[str(name)] = (
                "optimizer state (--drop-optimizer)"
                if drop_optimizer
                else "optimizer state: only a single .pth output carries it"
            )
            continue
        try:
            plain = _plain(value)
        except _NotPlain:
            dropped[str(name)] = _why_not_plain(value)
            continue
        if keep:
            kept[str(name)] = plain
        else:
            dropped[str(name)] = "--keep-extras keeps it"
    return kept, dropped


class _Hasher:
    """The sha256 of the source and of each of its files (a sharded set's shards), computed in daemon
    threads while tensors stream (hashlib releases the GIL; a refused migration does not wait for them)."""

    def __init__(self, ckpt: Checkpoint) -> None:
        # a sharded source is identified by its index; a single file by itself
        self.path = ckpt.path if ckpt.format != DCP else os.path.join(ckpt.path, ".metadata")  # a DCP's like an index
        self.shards = tuple(f for f in ckpt.files if f != ckpt.path)
        self._todo = [self.path, *self.shards]
        self._digests: dict[str, str | BaseException] = {}
        self._lock = threading.Lock()
        self._threads = [
            threading.Thread(target=self._run, daemon=True, name="ckpt-sha256")
            for _ in range(max(1, min(len(self._todo), 4, os.cpu_count() or 1)))
        ]
        for t in self._threads:
            t.start()

    def _run(self) -> None:
        while True:
            with self._lock:
                if not self._todo:
                    return
                path = self._todo.pop(0)
            try:
                with open(path, "rb", buffering=0) as f:
                    digest: str | BaseException = hashlib.file_digest(f, "sha256").hexdigest()
            except BaseException as exc:  # noqa: BLE001 - re-raised in the caller's thread
                digest = exc
            self._digests[path] = digest

    def _result(self, path: str) -> str:
        for t in self._threads:
            t.join()
        digest = self._digests[path]
        if isinstance(digest, BaseException):
            raise digest
        return digest

    def hexdigest(self) -> str:
        return self._result(self.path)

    def shards_json(self, placeholder: bool = False) -> str:
        """``{"model-00001-of-00002.safetensors": "<sha256>", ...}``, sorted, of a fixed length."""
        by_name = {os.path.basename(p): "0" * 64 if placeholder else self._result(p) for p in self.shards}
        return json.dumps(dict(sorted(by_name.items())), separators=(",", ":"))


def _source_state(ckpt: Checkpoint) -> State:
    """The checkpoint's tensors as the plan's first state, with the aliases ckpt recorded in a
    safetensors file it wrote (``ckpt.aliases``) back beside their partners: names of its tensor,
    so a .pth gets them as one storage again, tied as they were before."""
    state = initial_state(ckpt.tensors)
    aliases: dict[str, list[str]] = {}
    for alias, name in checkpoint_aliases(ckpt).items():
        if name in state and alias not in state:
            aliases.setdefault(name, []).append(alias)
    if not aliases:
        return state
    out: State = {}
    for key, e in state.items():
        out[key] = e
        out.update((a, replace(e, key=a, reason="tied", tied_to=key)) for a in aliases.get(key, ()))
    return out


def _metadata(
    ckpt: Checkpoint,
    plan: Plan,
    applied: Applied,
    aliases: dict[str, str],
    kept: dict[str, Any],
    hasher: _Hasher | None,
) -> Metadata:
    meta: Metadata = {}
    if _string_metadata(ckpt):
        meta.update({k: v for k, v in kept.items()})
    else:
        meta.update({k: json.dumps(v) for k, v in kept.items()})
    meta.update(
        {
            "format": "pt",  # transformers refuses safetensors files without it
            "ckpt.version": __version__,
            "ckpt.source": os.path.basename(ckpt.path),
            "ckpt.operations": json.dumps([op.to_json() for op in plan.operations]),
        }
    )
    if hasher is not None:
        meta["ckpt.source_sha256"] = Deferred(64, hasher.hexdigest)
        if hasher.shards:  # a sharded source: each shard's digest too, not only the index's
            placeholder = hasher.shards_json(placeholder=True)
            meta["ckpt.source_shards_sha256"] = Deferred(len(placeholder), hasher.shards_json, placeholder)
    if ckpt.state_path:
        meta["ckpt.key"] = ckpt.state_path
    if plan.arch:
        meta["ckpt.arch"] = plan.arch
    if aliases:
        meta["ckpt.aliases"] = json.dumps(aliases)
    return meta


# --- values: where the bytes come from ------------------------------------------------------------


class _TargetValues:
    """The target model's initial values, built on first use (``torch.manual_seed(seed)`` first)."""

    def __init__(self, plan: Plan, seed: int) -> None:
        self.plan = plan
        self.seed = seed
        self._state: dict[str, Any] | None = None

    def get(self, key: str) -> Any:
        if self._state is None:
            import torch

            from .arch import build_model

            assert self.plan.arch is not None
            torch.manual_seed(self.seed)
            model = build_model(self.plan.arch, self.plan.arch_args, device="cpu")
            self._state = dict(model.state_dict())
        return self._state[key]

    def chunks(self, key: str) -> Iterator[bytes]:
        import torch

        t = self.get(key).detach().contiguous().reshape(-1)
        if t.numel() == 0:
            return
        data = memoryview(t.view(torch.uint8).numpy())
        for i in range(0, len(data), CHUNK_BYTES):
            yield bytes(data[i : i + CHUNK_BYTES])

    def release(self) -> None:
        self._state = None


def cast_bytes(data: bytes, source: str, dtype: str) -> bytes:
    """Cast raw little-endian values (C order) from ``source`` to ``dtype``, rounding as torch does."""
    import numpy as np

    arr = to_numpy(data, source)
    with np.errstate(over="ignore", invalid="ignore"):  # out of range becomes inf, as in torch
        if dtype == "float32":
            return bytes(arr.astype("<f4").tobytes())
        # torch rounds through float32 (double -> float -> half/bfloat16): the same here, bit for bit
        arr32 = arr.astype("<f4", copy=False)
        if dtype == "float16":
            return bytes(arr32.astype("<f2").tobytes())
    if dtype == "bfloat16":
        u = arr32.view("<u4")
        out = ((u + (((u >> 16) & 1) + 0x7FFF)) >> 16).astype("<u2")
        out[np.isnan(arr32)] = 0x7FC0  # torch's canonical NaN
        return bytes(out.tobytes())
    raise UsageError(f"cannot cast to {dtype}")


class _Nonfinite:
    """Records the keys whose written values hold NaN or Inf, checking chunks as they stream."""

    def __init__(self) -> None:
        self.keys: list[str] = []

    def watch(self, chunks: Iterable[bytes], dtype: str, keys: tuple[str, ...]) -> Iterator[bytes]:
        import numpy as np

        bad = False
        for chunk in chunks:
            if not bad and not np.isfinite(to_numpy(chunk, dtype)).all():
                bad = True
            yield chunk
        if bad:
            self.keys.extend(k for k in keys if k not in self.keys)


@dataclass
class _Built:
    layout: Layout
    shared: tuple[Shared, ...]
    aliases: dict[str, str]
    files: FileCache
    nonfinite: list[str] = field(default_factory=list)


def _nbytes(e: Entry) -> int:
    if is_composite(e) and e.ref is not None:
        return e.ref.nbytes  # a sparse tensor's bytes are its parts'
    return numel(e.shape) * itemsize(e.dtype)


def _layout(state: State, fmt: str, values: _TargetValues, check_all: bool) -> _Built:
    """Decide the storages (blobs) and the tensors viewing them, for ``fmt``.

    Tensors viewing one input storage stay one storage in ``.pth``. safetensors has no shared
    storage: identical views are written once and the other names become aliases (as safetensors'
    own converter does); different views of one storage are written as separate tensors.
    """
    files = FileCache()
    checker = _Nonfinite()
    blobs: list[Blob] = []
    views: list[View] = []
    shared: list[Shared] = []
    aliases: dict[str, str] = {}

    def blob_of(entries: list[Entry], span: TensorRef | None) -> int:
        e = entries[0]
        keys = tuple(x.key for x in entries)
        # training state beside the state dict (moments, scheduler values) is carried, not judged
        check = (
            is_floating(e.dtype)
            and not e.key.startswith(CARRIED)
            and (check_all or e.source != CHECKPOINT or e.dtype != e.source_dtype or bool(e.transform))
        )
        nbytes = span.nbytes if span is not None else numel(e.shape) * itemsize(e.source_dtype)
        nbytes = nbytes // itemsize(e.source_dtype) * itemsize(e.dtype)

        def chunks() -> Iterator[bytes]:
            if nbytes == 0:
                return iter(())
            if e.transform:
                raw: Iterable[bytes] = computed_chunks(e, files, CHUNK_BYTES)
            elif span is not None:
                # a cast holds a few copies of each chunk: smaller chunks keep that small
                raw = iter_raw_chunks(span, files, CAST_CHUNK_BYTES if e.dtype != e.source_dtype else CHUNK_BYTES)
            else:
                raw = values.chunks(e.origin)
            if e.dtype != e.source_dtype:
                raw = (cast_bytes(c, e.source_dtype, e.dtype) for c in raw)
            return checker.watch(raw, e.dtype, keys) if check else iter(raw)

        verbatim = span is not None and span.is_contiguous and e.dtype == e.source_dtype and not check
        copy_from = (span.file, span.offset) if verbatim and span is not None and span.offset is not None else None
        blobs.append(Blob(e.dtype, nbytes, chunks, copy_from))
        return len(blobs) - 1

    groups: dict[tuple[Any, ...], list[Entry]] = {}
    for e in state.values():
        if not is_composite(e):
            groups.setdefault(_group_key(e, fmt), []).append(e)
    # sparse and quantized tensors (.pth): each part its own blob, carried as it is
    views.extend(
        composite_views((e for e in state.values() if is_composite(e)), lambda ref: blob_of([Entry.from_ref(ref)], ref))
    )
    for entries in groups.values():
        first = entries[0]
        same_view = len({_view_key(x) for x in entries}) == 1
        if first.ref is None or same_view or first.transform:
            index = blob_of(entries, None if first.transform else first.ref)
            for x in entries:
                views.append(View(x.key, index, x.dtype, x.shape, contiguous_strides(x.shape)))
            if len(entries) > 1:
                how = "one storage" if fmt == PTH else "alias"
                shared.append(Shared(tuple(x.key for x in entries), first.key, how))
            continue
        # .pth only: different views of one storage -> the span they cover, written once
        refs = [x.ref for x in entries if x.ref is not None]
        lo = min(r.storage_offset for r in refs)
        hi = max(r.storage_offset + r.span_elements for r in refs)
        span = TensorRef(
            f"{first.key} (storage)",
            first.source_dtype,
            (hi - lo,),
            (1,),
            first.ref.storage,
            lo,
            first.ref.storage_nbytes,
            first.ref.data_offset,
            first.ref.file,
        )
        index = blob_of(entries, span)
        for x in entries:
            assert x.ref is not None
            views.append(View(x.key, index, x.dtype, x.shape, x.ref.stride, x.ref.storage_offset - lo))
        shared.append(Shared(tuple(x.key for x in entries), first.key, "one storage"))
    if fmt == SAFETENSORS:
        _note_copies(state, shared)
        for s in shared:
            for alias in s.keys[1:] if s.how == "alias" else ():
                aliases[alias] = s.written_as
        views = [v for v in views if v.key not in aliases]
    # views follow the state's order, whatever the grouping
    order = {k: i for i, k in enumerate(state)}
    views.sort(key=lambda v: order[v.key])
    built = _Built(Layout(tuple(blobs), tuple(views)), tuple(shared), aliases, files)
    built.nonfinite = checker.keys
    return built


def _view_key(e: Entry) -> tuple[Any, ...]:
    if e.ref is None:
        return (e.origin,)
    return (e.ref.storage_offset, e.ref.shape, e.ref.stride)


def _group_key(e: Entry, fmt: str) -> tuple[Any, ...]:
    if e.transform:  # computed values: a storage of their own
        return ("computed", e.key)
    if e.ref is None:
        return ("target", e.origin)
    storage = (e.ref.storage, e.source_dtype, e.dtype)
    return storage if fmt == PTH else storage + _view_key(e)


def _note_copies(state: State, shared: list[Shared]) -> None:
    """safetensors: different views of one input storage are written as copies; say so."""
    by_storage: dict[str, list[str]] = {}
    for e in state.values():
        if e.ref is not None:
            by_storage.setdefault(e.ref.storage, []).append(e.key)
    aliased = {k for s in shared for k in s.keys[1:]}
    for keys in by_storage.values():
        written = [k for k in keys if k not in aliased]
        if len(written) > 1:
            shared.append(Shared(tuple(written), written[0], "copies"))


def _planned_files(output: str, layout: Layout, max_shard_size: int | None) -> list[str]:
    from .writer import shard_plan

    return shard_plan(output, layout, max_shard_size)[1]
