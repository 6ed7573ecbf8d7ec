"""Write a torch.distributed.checkpoint directory, one tensor in memory at a time (imports torch).

The layout is the one torch's ``FileSystemWriter`` writes for a single process (see
:mod:`ckpt_tool.formats.dcp`): each tensor ``torch.save``'d whole into ``__0_0.distcp`` as one chunk,
each plain-data entry ``torch.save``'d as a bytes item, and ``.metadata`` pickled from torch's own
metadata classes, so ``torch.distributed.checkpoint.load`` reads it as it reads its own output.
The directory is written under a temporary name beside the output, fsynced, then renamed.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable, Iterable
from dataclasses import replace
from typing import Any

from .checkpoint import DENSE, Progress, contiguous_strides
from .errors import OutputError, UsageError
from .formats.dcp import FORMAT, METADATA
from .writer import Layout, Written, _fsync_dir  # the one directory fsync

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
    import torch
    from torch.distributed.checkpoint import filesystem as fs
    from torch.distributed.checkpoint import metadata as md

    parent = os.path.dirname(os.path.abspath(path))
    try:
        tmp = tempfile.mkdtemp(dir=parent, prefix=f".{os.path.basename(path)}.", suffix=".tmp")
    except OSError as exc:
        raise OutputError(f"{path}: cannot create a directory in {parent} ({exc.strerror or exc})") from None
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes it 0700; give it the mode mkdir would
    total = sum(layout.blobs[i].nbytes for i in layout.blob_indexes())
    entries: dict[str, Any] = {}
    storage: dict[Any, Any] = {}
    try:
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
            out.flush()
            os.fsync(out.fileno())
        meta = md.Metadata(state_dict_metadata=entries, planner_data={k: (k,) for k in entries}, storage_data=storage)
        with open(os.path.join(tmp, METADATA), "wb") as f:
            import pickle

            pickle.dump(meta, f)
            f.flush()
            os.fsync(f.fileno())
        _fsync_dir(tmp)
        staged = Written(tmp, FORMAT, (tmp,), len(layout.views), sum(v.nbytes for v in layout.views))
        if before_commit is not None and before_commit(staged) is False:
            shutil.rmtree(tmp, ignore_errors=True)
            return replace(staged, path=path, files=(path,), committed=False)
        _replace(tmp, path)
    except OSError as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        raise OutputError(f"{path}: cannot be written ({exc.strerror or exc})") from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return Written(path, FORMAT, (path,), len(layout.views), sum(v.nbytes for v in layout.views))


def _replace(tmp: str, path: str) -> None:
    """Put the new directory in place; an old one is moved aside first and removed only after."""
    old = None
    if os.path.lexists(path):
        old = tempfile.mkdtemp(
            dir=os.path.dirname(os.path.abspath(path)), prefix=f".{os.path.basename(path)}.", suffix=".old"
        )
        os.rmdir(old)
        os.replace(path, old)
    os.replace(tmp, path)
    _fsync_dir(os.path.dirname(os.path.abspath(path)))
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
