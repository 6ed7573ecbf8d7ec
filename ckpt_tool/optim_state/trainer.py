"""A Hugging Face ``Trainer`` checkpoint directory through ``migrate``: weights, ``optimizer.pt``, the rest.

The Trainer does not give its optimizer ``model.parameters()``: ``Trainer.create_optimizer`` builds
two param groups from ``model.named_parameters()``, first the parameters that get weight decay
(``get_decay_parameter_names``: not inside an ``nn.LayerNorm``, and no ``bias``/``layernorm``/
``rmsnorm``/``norm`` in the lower-cased name), then the others, so the optimizer's ids interleave
relative to the model's order. :func:`trainer_groups` rebuilds both lists from an architecture (on
the meta device); the ids are tied to them group by group and checked (group sizes, moment shapes),
and the output's groups are the Trainer's for the target model.

``diff`` and ``finetune-check --resume-optimizer`` read ``optimizer.pt`` with the same groups
(:func:`tie_trainer_ids`); ``inspect``, header-only, describes it without tying its ids.

The output directory is staged beside its final name (hidden ``.OUT.*.tmp``), every file verified
(the weights by ``migrate``'s re-read and strict load, ``optimizer.pt`` by value, the copies by
sha256), fsynced, then renamed into place in one step.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

from ..checkpoint import Checkpoint
from ..errors import CkptError, OutputError, UsageError
from ..formats.hf_trainer import CONFIG, OPTIMIZER, STATE, TrainerDir, TrainerFile, read_trainer_dir
from ..plan import Plan, State
from ..text import some
from ..writer import StagedDirectory
from .carry import Carried, carry
from .ids import (
    _RENAMES,
    MappingError,
    OptimizerState,
    is_optimizer_state,
    map_ids_by_groups,
    read_optimizer,
)
from .report import Found

if TYPE_CHECKING:
    from ..arch import TargetSignature
    from ..migrate import MigrateReport, MigrationPlan

# transformers' get_decay_parameter_names: names that never get weight decay (lower-cased)
_NO_DECAY = re.compile(r"bias|layernorm|rmsnorm|(?:^|\.)norm(?:$|\.)|_norm(?:$|\.)")


@dataclass(frozen=True)
class TrainerPlan:
    """What happens to a Trainer checkpoint directory's files, shown before anything is written."""

    source: str  # the directory
    output: str | None  # the directory written
    weights: str  # the weights file (or index) in both, migrated by the plan
    optimizer: str  # "carried", "dropped (--drop-optimizer)" or "none in the checkpoint"
    copied: tuple[TrainerFile, ...]  # carried bit-identical (never loaded)
    replaces: bool = False  # --force: an existing Trainer directory under the output's name goes
    config: str = ""  # config.json written from the target (--arch hf:), and from which file


# --- which id is which parameter ------------------------------------------------------------------


def trainer_groups(spec: str, arch_args: dict[str, Any] | None = None) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """The Trainer's param groups for ``spec``'s model: (weight decay, no weight decay), each in
    ``named_parameters()`` order, as ``Trainer.create_optimizer`` builds them (all parameters trainable).

    Example:
        >>> decay, no_decay = trainer_groups("hf:checkpoint-500")  # doctest: +SKIP
        >>> decay[:1], no_decay[:1]  # doctest: +SKIP
        (('bert.embeddings.word_embeddings.weight',), ('bert.embeddings.LayerNorm.weight',))
    """
    from ..arch import build_model

    return trainer_groups_of(build_model(spec, arch_args, device="meta", fallback="cpu"))


def _decay_names(module: Any) -> list[str]:
    """transformers' ``get_parameter_names(model, [nn.LayerNorm], patterns)``: the same walk, the same tests."""
    import torch

    out = []
    for name, child in module.named_children():
        inner = _decay_names(child)
        if not isinstance(child, torch.nn.LayerNorm):
            out += [f"{name}.{n}" for n in inner if not _NO_DECAY.search(f"{name}.{n}".lower())]
    out += [k for k in module._parameters if not _NO_DECAY.search(k.lower())]
    return out


def trainer_groups_of(model: Any) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """:func:`trainer_groups` of a model already built."""
    decay = set(_decay_names(model))
    names = [n for n, _ in model.named_parameters()]
    return tuple(n for n in names if n in decay), tuple(n for n in names if n not in decay)


def read_trainer_optimizer(
    path: str, weights: Checkpoint, name: str = "optimizer"
) -> tuple[OptimizerState, Checkpoint]:
    """``optimizer.pt`` of the Trainer directory ``path`` (ids not tied yet, under ``name``) and the
    checkpoint its ids name parameters of: the weights, with the optimizer beside them."""
    from ..reader import read_raw

    opt_path = os.path.join(path, OPTIMIZER)
    raw = read_raw(opt_path).root
    if not is_optimizer_state(raw):
        raise UsageError(f"{opt_path}: not an optimizer.state_dict() (no 'state' and 'param_groups'); --drop-optimizer")
    # the optimizer's tensors live in optimizer.pt; the parameters they belong to in the weights
    ckpt = replace(weights, path=opt_path, root={"model": {}, name: raw}, state_path="model", files=(opt_path,))
    return read_optimizer(raw, name, opt_path), ckpt


def tie_trainer_ids(
    opt: OptimizerState,
    ckpt: Checkpoint,
    path: str,
    *,
    model: Any = None,
) -> OptimizerState:
    """Tie a Trainer optimizer's ids to the weights' parameter names, or raise :class:`MappingError`.

    Only the trained architecture tells the Trainer's groups (the names alone do not: an
    ``nn.LayerNorm`` is kept out of weight decay by its type, and a safetensors file does not keep
    ``named_parameters()`` order). Two sources may tell them: the model the ``config.json`` beside
    the weights describes (built on the meta device: the model that was trained) and ``model``
    (the one the caller trains). A source fits when its group sizes do and every moment is shaped
    like its parameter; same-shaped parameters in another order fit as well, so when both fit they
    must agree, or nothing is guessed. The config's model is preferred; ``model`` serves when
    there is no config, or it cannot be built (transformers missing, a custom model type).
    """
    tried: list[OptimizerState] = []
    failed: CkptError | None = None
    config = os.path.isfile(os.path.join(path, CONFIG))
    if config:
        spec = f"hf:{path}"
        by = f"the Trainer's param groups of {spec} (the config.json beside the weights)"
        try:
            tried.append(map_ids_by_groups(opt, ckpt, trainer_groups(spec), by))
        except CkptError as exc:
            if model is None:
                raise
            failed = exc
    if model is not None:
        try:
            tried.append(map_ids_by_groups(opt, ckpt, trainer_groups_of(model), "the Trainer's param groups of --arch"))
        except MappingError as exc:
            failed = failed or exc
    if len(tried) == 2 and tried[0].names != tried[1].names:
        differ = [f"{a} / {b}" for (_, a), (_, b) in zip(tried[0].names, tried[1].names) if a != b]
        raise MappingError(
            f"{ckpt.path}: {opt.path}: config.json's model and --arch order the same-shaped parameters "
            f"differently ({some(differ)}): which moments "
            "belong to which parameter cannot be told"
        )
    if tried:
        return tried[0]
    if failed is not None:
        raise failed
    raise MappingError(
        f"{ckpt.path}: {opt.path}: a Trainer's ids follow its param groups (weight decay, then none), which "
        "only the architecture tells" + ("" if config else " (no config.json beside the weights)")
    )


def _source_groups(
    d: TrainerDir, plan: Plan, final: State, signature: TargetSignature | None
) -> tuple[tuple[tuple[str, ...], ...], str]:
    """The source's Trainer groups (checkpoint names) and where they come from, or :class:`MappingError`."""
    if plan.source_arch:
        return trainer_groups(plan.source_arch), f"the Trainer's param groups of --source-arch {plan.source_arch}"
    if signature is not None and plan.arch and all(op.op in _RENAMES for op in plan.operations):
        back = {k: e.origin for k, e in final.items() if e.from_checkpoint}
        groups = trainer_groups(plan.arch, plan.arch_args)
        return tuple(tuple(back.get(k, k) for k in g) for g in groups), (
            f"the Trainer's param groups of --arch {plan.arch} (the plan only renames)"
        )
    if os.path.isfile(os.path.join(d.path, CONFIG)):
        spec = f"hf:{d.path}"
        return trainer_groups(spec), f"the Trainer's param groups of {spec} (the config.json beside the weights)"
    raise MappingError(
        f"{os.path.join(d.path, OPTIMIZER)}: the Trainer's ids follow its param groups (weight decay, then "
        "none), which only the trained architecture tells: pass --source-arch SPEC, or --drop-optimizer "
        "to leave it out"
    )


def _target_groups(
    opt: OptimizerState, plan: Plan, final: State, signature: TargetSignature | None
) -> tuple[tuple[str, ...], ...]:
    """The output's groups: the Trainer's for ``--arch``; without one, the source's, renamed and filtered."""
    if signature is not None and plan.arch:
        return tuple(tuple(k for k in g if k in final) for g in trainer_groups(plan.arch, plan.arch_args))
    new = {e.origin: k for k, e in final.items() if e.from_checkpoint and not e.tied_to}
    names = opt.name_of()
    return tuple(tuple(new[names[i]] for i in g.params if names[i] in new) for g in opt.groups)


def _carry_optimizer(d: TrainerDir, weights: Checkpoint, plan: Plan, final: State, signature: Any) -> Carried:
    opt, ckpt = read_trainer_optimizer(d.path, weights)
    groups, by = _source_groups(d, plan, final, signature)
    opt = map_ids_by_groups(opt, ckpt, groups, by)
    opt = replace(opt, regroup=_target_groups(opt, plan, final, signature))
    return carry(ckpt, plan.operations, final, target=signature, optimizers=(opt,))


def trainer_optimizers(path: str, weights: Checkpoint) -> tuple[Found, ...]:
    """``optimizer.pt`` of the Trainer directory ``path`` for ``diff``: its ids tied by
    :func:`tie_trainer_ids`, or why they are not."""
    if read_trainer_dir(path).optimizer is None:
        return ()
    opt, ckpt = read_trainer_optimizer(path, weights)
    try:
        return ((tie_trainer_ids(opt, ckpt, path), ckpt, ""),)
    except CkptError as exc:  # not tied, or the config's model not built (no transformers): said, not fatal
        return ((opt, ckpt, str(exc).partition(": ")[2].partition(" (pass")[0]),)


def describe_trainer(path: str, weights: Checkpoint) -> tuple[str, tuple[Any, ...], tuple[str, ...]]:
    """For ``inspect`` (header-only, no torch): the format line, ``optimizer.pt``'s summary and the
    directory's other files, for the Trainer directory ``path`` whose weights are ``weights``."""
    from .report import summarize_optimizers

    d = read_trainer_dir(path)
    summaries: tuple[Any, ...] = ()
    if d.optimizer is not None:
        try:
            opt, ckpt = read_trainer_optimizer(path, weights)
        except UsageError:
            pass  # not an optimizer state: no summary
        else:
            why = (
                "a Trainer's ids follow its param groups (weight decay, then none), which only the "
                "architecture tells: migrate ties them (--source-arch, or the config.json beside the weights)"
            )
            summaries = summarize_optimizers(weights, found=((opt, ckpt, why),))
    files = tuple(f"{f.name}: {f.what}" for f in d.copied)
    return f"Hugging Face Trainer checkpoint ({weights.format})", summaries, files


# --- the whole directory --------------------------------------------------------------------------


def migrate_trainer(
    plan: Plan,
    output: str | None,
    *,
    seed: int = 0,
    force: bool = False,
    dry_run: bool = False,
    on_plan: Callable[[MigrationPlan], None] | None = None,
    refused: dict[str, Any] | None = None,
    **options: Any,
) -> MigrateReport:
    """Migrate the Trainer checkpoint directory ``plan.source`` into the directory ``output``.

    The weights get the plan (in the input's format and file name), ``optimizer.pt`` is carried
    through the same operations, every other file is copied bit-identical. ``output`` must not exist
    (``force`` replaces a Trainer checkpoint directory, nothing else). ``options`` go to ``migrate``.
    """
    from ..arch import target_signature
    from ..migrate import migrate
    from ..plan import apply, initial_state
    from ..reader import open_checkpoint

    assert plan.source is not None
    for option, value in (refused or {}).items():
        if value:
            raise UsageError(
                f"{option}: a Trainer checkpoint directory is written as a new directory, as it is laid out"
            )
    if plan.also_keys:
        raise UsageError(f"--also-key {plan.also_keys[0]}: a Trainer checkpoint directory has one state dict")
    d = read_trainer_dir(plan.source)
    if output is not None:
        output = output.rstrip("/") or output  # OUT_DIR/ names the directory OUT_DIR
    if output is None and not dry_run:
        raise UsageError("no output given: pass -o OUT_DIR (a new directory) or --dry-run")
    replaces = _check_output_dir(output, d.path, force) if output is not None else False
    weights_path = os.path.join(d.path, d.weights)
    weights = open_checkpoint(weights_path)
    signature = target_signature(plan.arch, plan.arch_args) if plan.arch else None
    final = apply(plan.operations, initial_state(weights.tensors), signature, objects=tuple(weights.objects)).state
    carried = None
    if d.optimizer is not None and not plan.drop_optimizer:
        carried = _carry_optimizer(d, weights, plan, final, signature)
    state = (
        "none in the checkpoint"
        if d.optimizer is None
        else "dropped (--drop-optimizer)"
        if carried is None
        else "carried"
    )
    copied, config = _config_role(d, plan)
    trainer = TrainerPlan(d.path, output, d.weights, state, copied, replaces, config)

    def shown(p: MigrationPlan) -> MigrationPlan:
        files = tuple(os.path.join(output, os.path.basename(f)) for f in p.files) if output else ()
        return replace(
            p,
            source=d.path,
            output=output,
            files=files,
            optimizers=carried.optimizers if carried else (),
            trainer=trainer,
        )

    def show(p: MigrationPlan) -> None:
        if on_plan is not None:
            on_plan(shown(p))

    weights_plan = replace(plan, source=weights_path, drop_optimizer=False)
    shard = max((os.path.getsize(os.path.join(d.path, s)) for s in d.shards), default=0) or None
    out_name = d.weights.removesuffix(".index.json")
    if dry_run or output is None:
        report = migrate(weights_plan, None, seed=seed, dry_run=True, on_plan=show, **options)
        return replace(report, plan=shown(report.plan))
    with StagedDirectory(output) as staging:  # removed on the way out unless renamed into place
        staged = staging.path
        report = migrate(
            weights_plan, os.path.join(staged, out_name), seed=seed, max_shard_size=shard, on_plan=show, **options
        )
        differ, checked = [], 0
        if carried is not None:
            from ..migrate import write_training_file

            _, bad, n = write_training_file(carried, os.path.join(staged, OPTIMIZER), "optimizer")
            differ += [os.path.join(OPTIMIZER, k) for k in bad]
            checked += n
        if config:
            _write_config(plan, os.path.join(staged, CONFIG))
        for f in copied:
            if not _copy_verified(os.path.join(d.path, f.name), os.path.join(staged, f.name)):
                differ.append(f.name)
        written = report.written
        assert written is not None
        # a directory with any file not as planned is never renamed into place, as a file is not
        committed = written.committed and not differ
        if committed:
            staging.commit()  # an old directory (--force) is replaced only once the new one is there
    v = report.verification
    if v is not None:
        v = replace(v, differ=v.differ + tuple(differ), checked=v.checked + checked)
    moved = {p: os.path.join(output, os.path.relpath(p, staged)) for p in (written.path, *written.files)}
    written = replace(
        written, path=moved[written.path], files=tuple(moved[p] for p in written.files), committed=committed
    )
    return replace(report, plan=shown(report.plan), written=written, verification=v)


def _config_role(d: TrainerDir, plan: Plan) -> tuple[tuple[TrainerFile, ...], str]:
    """The files copied as they are, and where a new ``config.json`` comes from (``""``: copied).

    With ``--arch hf:CONFIG`` the output is that architecture's, so its config (with the
    ``--arch-arg`` fields) replaces the source's; otherwise the source's is copied, and said to be
    the source's when the plan changes the weights."""
    from ..arch import HF_PREFIX, hf_config_path

    if not any(f.name == CONFIG for f in d.copied):
        return d.copied, ""
    source = os.path.join(d.path, CONFIG)
    if plan.arch and plan.arch.startswith(HF_PREFIX):
        target = hf_config_path(plan.arch)
        if plan.arch_args or not os.path.samefile(target, source):
            args = "".join(f", {k}={v!r}" for k, v in plan.arch_args.items())
            return tuple(f for f in d.copied if f.name != CONFIG), f"{target}{args}"
        return d.copied, ""
    if not plan.operations:
        return d.copied, ""
    what = "model config, the source's: it may not describe the migrated weights (--arch hf:CONFIG writes the target's)"
    return tuple(TrainerFile(f.name, what) if f.name == CONFIG else f for f in d.copied), ""


def _write_config(plan: Plan, dest: str) -> None:
    """The target's config.json, built as ``--arch hf:`` builds the model (the file, then --arch-arg)
    and written by transformers itself, as ``save_pretrained`` writes it."""
    import json

    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    from ..arch import hf_config_path

    assert plan.arch is not None
    with open(hf_config_path(plan.arch), encoding="utf-8") as f:
        raw = json.load(f)
    config = CONFIG_MAPPING[raw["model_type"]].from_dict({**raw, **plan.arch_args})
    config.to_json_file(dest)
    with open(dest, encoding="utf-8") as f:
        if json.load(f).get("model_type") != raw["model_type"]:
            raise OutputError(f"{dest}: the written config does not read back")


def _check_output_dir(output: str, source: str, force: bool) -> bool:
    """Refuse an output that would lose data; True when ``force`` replaces an existing Trainer directory."""
    parent = os.path.dirname(os.path.abspath(output))
    if not os.path.isdir(parent):
        raise OutputError(f"-o {output}: directory {parent} does not exist")
    src = os.path.realpath(source)
    out = os.path.realpath(output)
    if out == src or out.startswith(src + os.sep) or src.startswith(out + os.sep):
        raise OutputError(f"-o {output}: is the input directory or inside it; write a new directory")
    if not os.path.lexists(output):
        return False
    if not force:
        raise OutputError(f"-o {output}: already exists; pass --force to replace it")
    if not os.path.isdir(output) or os.path.islink(output):
        raise OutputError(f"-o {output}: exists and is not a directory; move it away")
    if os.listdir(output) and not os.path.isfile(os.path.join(output, STATE)):
        raise OutputError(
            f"-o {output}: --force replaces a Trainer checkpoint directory only, and this one holds no {STATE}"
        )
    return True


def _copy_verified(source: str, dest: str) -> bool:
    """Copy ``source``'s bytes (never parsing them), fsync, and compare both files' sha256."""
    with open(source, "rb") as src, open(dest, "xb") as out:
        shutil.copyfileobj(src, out, 4 * 1024 * 1024)
        out.flush()
        os.fsync(out.fileno())
    shutil.copymode(source, dest)
    return _sha256(source) == _sha256(dest)


def _sha256(path: str) -> str:
    with open(path, "rb", buffering=0) as f:
        return hashlib.file_digest(f, "sha256").hexdigest()
