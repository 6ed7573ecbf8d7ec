"""Hugging Face ``Trainer`` checkpoint directories (``checkpoint-500/``): what each file is.

``Trainer._save_checkpoint`` writes the model (``model.safetensors``, ``pytorch_model.bin``, or
shards with an index), ``optimizer.pt``, ``scheduler.pt``, ``rng_state*.pth``, ``trainer_state.json``,
``training_args.bin`` and, with mixed precision, ``scaler.pt``; ``save_pretrained`` adds
``config.json`` and friends. ``trainer_state.json`` is the sentinel: no other layout writes it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from ..errors import InputError

STATE = "trainer_state.json"
OPTIMIZER = "optimizer.pt"
ARGS = "training_args.bin"
CONFIG = "config.json"
WEIGHTS = ("model.safetensors", "pytorch_model.bin")
INDEXES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")

# files that do not depend on the parameters: carried bit-identical, never read
_KIND = {
    "scheduler.pt": "LR scheduler state",
    "scaler.pt": "GradScaler state",
    STATE: "step, epoch and log history",
    ARGS: "a pickled TrainingArguments object: its bytes copied, never loaded",
    CONFIG: "model config",
}


@dataclass(frozen=True)
class TrainerFile:
    """A file of the directory carried as it is, and what it holds."""

    name: str
    what: str


@dataclass(frozen=True)
class TrainerDir:
    """The files of a Trainer checkpoint directory, by role (names relative to ``path``)."""

    path: str
    weights: str  # the file migrate opens: a weights file or an index
    shards: tuple[str, ...]  # the index's shard files (empty for a single file)
    optimizer: str | None
    copied: tuple[TrainerFile, ...]


def is_trainer_dir(path: str) -> bool:
    """Whether ``path`` is a directory a Trainer checkpoint wrote (it holds ``trainer_state.json``)."""
    return os.path.isdir(path) and os.path.isfile(os.path.join(path, STATE))


def read_trainer_dir(path: str) -> TrainerDir:
    """Sort the directory's files by role; refuse what ckpt cannot carry (a subdirectory, no weights)."""
    import json

    names = sorted(os.listdir(path))
    subdirs = [n for n in names if os.path.isdir(os.path.join(path, n))]
    if subdirs:
        raise InputError(
            f"{path}: Trainer checkpoint holds a directory {subdirs[0]!r} (DeepSpeed or FSDP state?): "
            "ckpt carries the files of a plain Trainer checkpoint only"
        )
    weights = next((n for n in INDEXES if n in names), None) or next((n for n in WEIGHTS if n in names), None)
    if weights is None:
        raise InputError(f"{path}: Trainer checkpoint without model weights ({', '.join(WEIGHTS)} or an index)")
    shards: tuple[str, ...] = ()
    if weights in INDEXES:
        try:
            with open(os.path.join(path, weights), encoding="utf-8") as f:
                shards = tuple(sorted(set(json.load(f)["weight_map"].values())))
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            raise InputError(f"{os.path.join(path, weights)}: not a sharded index ({exc})") from None
    model_files = {weights, *shards}
    optimizer = OPTIMIZER if OPTIMIZER in names else None
    copied = tuple(TrainerFile(n, _what(n)) for n in names if n not in model_files and n != optimizer)
    return TrainerDir(path, weights, shards, optimizer, copied)


def _what(name: str) -> str:
    if name in _KIND:
        return _KIND[name]
    if name.startswith("rng_state") and name.endswith(".pth"):
        return "random number generator states"
    return "parameter-independent file"
