"""Scanning one ``.distcp`` file of a torch.distributed.checkpoint directory, item by item.

The file is a run of ``torch.save`` archives that ``.metadata`` places; ``dcp.load`` reads each
tensor chunk with ``torch.load(weights_only=True)`` but each bytes entry with
``torch.load(weights_only=False)``, so every archive's pickles are judged like any other file's.
The directory's ``.metadata`` is itself a pickle, scanned as a file of its own.
"""

from __future__ import annotations

import os

from ..errors import FormatError, InputError
from ..formats.dcp import METADATA, Window, read_metadata
from ..formats.ziparchive import list_stream, read_entry
from .report import _Streams
from .walkers import MAX_ENTRY, _is_pickle_entry, _scan_bytes, _scan_zip


def scan_distcp(path: str, out: _Streams) -> None:
    directory = os.path.dirname(os.path.abspath(path))
    try:
        meta = read_metadata(directory)
    except (FormatError, InputError) as exc:
        out.notes.append(f"no readable {METADATA} beside it ({exc}): scanned as the one torch zip its end record names")
        _scan_zip(path, out)
        return
    out.format = "dcp-shard"
    mine = [(what, item) for what, item in meta.items() if os.path.realpath(item.file) == os.path.realpath(path)]
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        for what, item in mine:
            if item.offset + item.length > size:
                out.broken(
                    f"{what}: recorded at bytes {item.offset}-{item.offset + item.length}, past the end of "
                    f"the file ({size} bytes)",
                    what,
                )
                continue
            window = Window(f, item.offset, item.length)
            label = f"{path}@{item.offset}"
            try:
                listing = list_stream(window, label, item.length)  # type: ignore[arg-type]
            except FormatError as exc:
                out.broken(f"{what}: {str(exc).removeprefix(label + ': ')}", what)
                continue
            for e in (*listing.entries, *listing.others):
                if not _is_pickle_entry(e.name):
                    continue
                stream = f"{what}: {e.name}"
                try:
                    data = read_entry(window, e, label, MAX_ENTRY)  # type: ignore[arg-type]
                except FormatError as exc:
                    out.broken(str(exc).removeprefix(f"{label}: "), stream)
                    continue
                _scan_bytes(out, stream, data, e.compressed_size)
    out.notes.append(
        f"{len(mine)} stored items named by {METADATA}, each a torch.save archive (dcp.load unpickles "
        "bytes entries with weights_only=False)"
    )
