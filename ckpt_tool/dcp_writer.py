"""Write a torch.distributed.checkpoint directory, one tensor in memory at a time (imports torch).

The layout is the one torch's ``FileSystemWriter`` writes for a single process (see
:mod:`ckpt_tool.formats.dcp`): each tensor ``torch.save``'d whole into ``__0_0.distcp`` as one chunk,
each plain-data entry ``torch.save``'d as a bytes item, and ``.metadata`` pickled from torch's own
metadata classes, so ``torch.distributed.checkpoint.load`` reads it as it reads its own output.
The directory is staged beside the output and renamed into place by :class:`ckpt_tool.writer.StagedDirectory`.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from dataclasses import replace
from typing import Any

from .checkpoint import DENSE, Progress, contiguous_strides
from .errors import OutputError, UsageError
from .formats.dcp import FORMAT, METADATA
from .writer import Layout, StagedDirectory, Written

SHARD_FILE = "__0_0.distcp"


def check_dcp_output(path: str, inputs: Iterable[str], *, force: bool = False) -> None:
    """Refuse a DCP output that would replace an input, or an existing path without ``force``."""
    parent = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(parent):
        raise OutputError(f"{path}: directory {parent} does not exist")
    real = os.path.realpath(path)
    for p in inputs:
        rp = os.path.realpath(p)
        if rp == real or rp.startswith(real + os.sep):
            raise OutputError(f"{path}: would replace the input {p}; write the DCP directory elsewhere")
    if os.path.lexists(path) and not force:
        raise OutputError(f"{path}: already exists; pass --force to replace it")
    if os.path.lexists(path) and not os.path.isdir(path):
        raise OutputError(f"{path}: exists and is not a directory; a DCP output is a directory")


def write_dcp(
    path: str,
    layout: Layout,
    *,
    progress: Progress | None = None,
    before_commit: Callable[[Written], bool | None] | None = None,
    **_: Any,
) -> Written:
    """Write ``layout`` (plain tensors and plain-data entries) as a DCP directory at ``path``, atomically.

    ``before_commit`` sees the staged directory before it is renamed into place, as for
    :func:`ckpt_tool.writer.write_checkpoint`: ``False`` (or an exception) leaves ``path`` as it was.
    """
    for v in layout.views:
        if v.kind != DENSE or v.parts:
            raise UsageError(
                f"tensor {v.key!r} is {v.kind.replace('_', ' ')}; a DCP output holds plain tensors "
                "only: pass --dequantize or --densify"
            )
    with StagedDirectory(path) as staging:
        try:
            _write_files(staging.path, layout, progress)
        except OSError as exc:
            raise OutputError(f"{path}: cannot be written ({exc.strerror or exc})") from None
        staged = Written(staging.path, FORMAT, (staging.path,), len(layout.views), sum(v.nbytes for v in layout.views))
        if before_commit is not None and before_commit(staged) is False:
            return replace(staged, path=path, files=(path,), committed=False)
        staging.commit()  # fsynced, then renamed into place; an old directory is replaced only then
    return Written(path, FORMAT, (path,), len(layout.views), sum(v.nbytes for v in layout.views))


def _write_files(tmp: str, layout: Layout, progress: Progress | None) -> None:
    """``__0_0.distcp`` and ``.metadata`` in the staged directory ``tmp``."""
    import torch
    from torch.distributed.checkpoint import filesystem as fs
    from torch.distributed.checkpoint import metadata as md

    total = sum(layout.blobs[i].nbytes for i in layout.blob_indexes())
    entries: dict[str, Any] = {}
    storage: dict[Any, Any] = {}
    with open(os.path.join(tmp, SHARD_FILE), "wb") as out:
        for v in layout.views:
            blob = layout.blobs[v.blob]
            data = bytearray(b"".join(blob.chunks()))
            dtype = getattr(torch, v.dtype)
            flat = torch.frombuffer(data, dtype=torch.uint8) if data else torch.empty(0, dtype=torch.uint8)
            tensor = flat.view(dtype).as_strided(v.shape, v.stride or contiguous_strides(v.shape), v.offset)
            tensor = tensor.contiguous()
            zeros = torch.Size([0] * len(v.shape))
            start = out.tell()
            torch.save(tensor, out)
            entries[v.key] = md.TensorStorageMetadata(
                md.TensorProperties(dtype=dtype),
                torch.Size(v.shape),
                [md.ChunkStorageMetadata(offsets=zeros, sizes=torch.Size(v.shape))],
            )
            storage[md.MetadataIndex(v.key, zeros, 0)] = fs._StorageInfo(SHARD_FILE, start, out.tell() - start)
            del tensor, flat, data
            if progress is not None:
                progress(blob.nbytes, total)
        for key, value in layout.objects:
            start = out.tell()
            torch.save(value, out)
            entries[key] = md.BytesStorageMetadata()
            storage[md.MetadataIndex(key)] = fs._StorageInfo(SHARD_FILE, start, out.tell() - start)
    meta = md.Metadata(state_dict_metadata=entries, planner_data={k: (k,) for k in entries}, storage_data=storage)
    with open(os.path.join(tmp, METADATA), "wb") as f:
        import pickle

        pickle.dump(meta, f)
