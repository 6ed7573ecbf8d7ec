"""Walking the pickles of each format: every stream a loader could run, each into its own trace.

A stream is read by our interpreter as CPython's C unpickler reads it. Where its FRAME blocks make
that reading differ from a straight one, both are walked. Where the interpreter stops (a defect),
the rest of the region is still walked opcode by opcode, so a break cannot hide what follows it.
"""

from __future__ import annotations

import io
import re
from typing import IO, Any

from ..errors import FormatError
from ..formats import npy
from ..formats import sniff as fmt
from ..formats.pickle_stream import WorkLimit, opcode_budget
from ..formats.pickle_vm import Event, PickleVM, StorageRef, TorchDType, Trace, build_storage_ref, storage_dtypes
from ..formats.safetensors import header_defects
from ..formats.torchfile import (
    Decoded,
    data_pkl_readable,
    offer_decoded,
    sharing_decodes,
    storage_loader,
    strict_loader,
    walk_legacy_storages,
)
from ..formats.ziparchive import ZipEntry, ZipListing, crc_ok, list_archive, read_entry
from .policy import BROKEN, SUSPICIOUS, UNSAFE
from .report import Finding, _Streams
from .torchscript import dangerous_calls

FALLBACK_WINDOW = 64 * 1024 * 1024  # bytes of a broken pickle region walked opcode by opcode
MAX_ENTRY = 1 << 30
MAX_CODE = 16 << 20  # bytes of TorchScript source read from one archive
_TAR_MEMBERS = ("sys_info", "pickle", "storages", "tensors")
_PICKLE_SUFFIXES = (".pkl", ".debug_pkl", ".pickle")


def _lenient_persistent_load(storages: dict[str, StorageRef] | None = None) -> Any:
    """A persistent-id resolver that never fails on a storage: scanning needs the names, not the bytes."""

    def resolve(key: str, dtype: str, location: str, numel: int) -> StorageRef:
        return build_storage_ref(key, dtype, location, numel, None, 0, "")

    strict = storage_loader(storages if storages is not None else {}, resolve)
    dtype_of = storage_dtypes()

    def load(pid: Any) -> Any:
        if isinstance(pid, tuple) and len(pid) >= 5 and pid[0] == "storage":
            if dtype_of(pid[1]) is None:
                pid = (pid[0], _BYTES, *pid[2:])  # an unknown storage type is still a storage here (of bytes)
            if not isinstance(pid[4], int) or isinstance(pid[4], bool) or pid[4] < 0:
                pid = (*pid[:4], 0, *pid[5:])
        return strict(pid)

    return load


_BYTES = TorchDType("uint8")


def _read_stream(out: _Streams, name: str, stream: IO[bytes], limit: int, budget: int, persistent: Any = None) -> Any:
    """One pickle as torch reads it; a desync also walks the straight reading. Raises FormatError."""
    start = stream.tell()
    trace = out.new(name)
    try:
        return PickleVM(persistent or _lenient_persistent_load(), trace, budget).load(stream, limit)
    finally:
        if trace.desync:
            at = trace.desync[0]
            out.findings.append(
                Finding(
                    UNSAFE,
                    "frame desync",
                    f"an opcode at byte {at} reads past the end of its "
                    "FRAME: CPython's C unpickler (torch.load) and pickletools read different "
                    "opcodes from there on; no pickler writes this",
                    name,
                    "FRAME",
                    at,
                )
            )
            end = stream.tell()
            stream.seek(start)
            straight = out.new(f"{name} (read straight on)")
            try:
                PickleVM(_lenient_persistent_load(), straight, budget, frames="sequential").load(stream, limit)
            except FormatError:
                stream.seek(start)
                _walk_opcodes(stream.read(min(limit - start, FALLBACK_WINDOW)), straight, start, budget)
            stream.seek(end)


def _scan_bytes(
    out: _Streams, name: str, data: bytes, stored: int | None = None, persistent: Any = None
) -> tuple[bool, Any]:
    """Scan one in-memory pickle stream (an archive entry); on a parse error, walk its opcodes.
    Returns whether the interpreter read it whole, and what it built."""
    budget = opcode_budget(len(data) if stored is None else stored)
    try:
        return True, _read_stream(out, name, io.BytesIO(data), len(data), budget, persistent)
    except WorkLimit as exc:
        out.broken(f"{name}: {exc}: {len(data):,} bytes in all", name)
    except FormatError as exc:
        out.broken(f"{name}: {exc}", name)
        trace = next(t for n, t in reversed(out.traces) if n == name)
        _walk_opcodes(data, trace, 0, budget)
    return False, None


# opcodes that take no argument; runs of them are stepped over at once (a flood of them is the
# cheap way to make a scanner spin)
_NO_ARG = b"().012NQR]abdelostu}\x81\x85\x86\x87\x88\x89\x8f\x90\x91\x92\x93\x94\x97\x98"
_NO_ARG_RUN = re.compile(b"[" + re.escape(_NO_ARG.replace(b"\x93", b"").replace(b"\x94", b"")) + b"]+")
_FIXED = {
    ord("K"): 1,
    ord("M"): 2,
    ord("J"): 4,
    ord("G"): 8,
    ord("q"): 1,
    ord("h"): 1,
    ord("r"): 4,
    ord("j"): 4,
    0x80: 1,
    0x95: 8,
    0x82: 1,
    0x83: 2,
    0x84: 4,
}
_SIZED = {
    ord("U"): 1,
    ord("C"): 1,
    0x8C: 1,
    0x8A: 1,
    ord("T"): 4,
    ord("B"): 4,
    ord("X"): 4,
    0x8B: 4,
    0x8D: 8,
    0x8E: 8,
    0x96: 8,
}
_LINES = {
    ord("I"): 1,
    ord("L"): 1,
    ord("F"): 1,
    ord("S"): 1,
    ord("V"): 1,
    ord("P"): 1,
    ord("p"): 1,
    ord("g"): 1,
    ord("c"): 2,
    ord("i"): 2,
}
_TEXT = {ord("U"), ord("X"), 0x8C, 0x8D, ord("T"), ord("V"), ord("S")}


def _walk_opcodes(data: bytes, trace: Trace, base: int = 0, budget: int | None = None) -> None:
    """Record every global in a region the interpreter could not finish, opcode by opcode.

    A stream that breaks our interpreter must not hide what comes after the break, so this walk
    keeps no stack: GLOBAL and INST name their globals outright; STACK_GLOBAL takes the two most
    recent strings (through the memo too), and counts as unresolved when there are none. The walk
    reads straight on (as pickletools does) and stops at the first byte that is not an opcode.
    """
    budget = opcode_budget(len(data)) if budget is None else budget
    strings: list[str] = []
    memo: dict[int, str | None] = {}
    last: str | None = None
    i, n, ops = 0, len(data), 0
    while i < n and ops < budget:
        op = data[i]
        at = base + i
        ops += 1
        if op in _NO_ARG:
            if op == 0x93:
                if len(strings) >= 2:
                    trace.globals.append(Event("STACK_GLOBAL", f"{strings[-2]}.{strings[-1]}", at, True, strings[-2]))
                else:
                    trace.globals.append(Event("STACK_GLOBAL", "?.?", at, resolved=False))
            elif op == 0x94:
                memo[len(memo)] = last
            run = _NO_ARG_RUN.match(data, i + 1) if op not in (0x93, 0x94) else None
            i = run.end() if run else i + 1
            continue
        if op in _FIXED:
            size = _FIXED[op]
            arg = int.from_bytes(data[i + 1 : i + 1 + size], "little")
            if op in (ord("q"), ord("r")):
                memo[arg] = last
            elif op in (ord("h"), ord("j")) and isinstance(memo.get(arg), str):
                strings.append(memo[arg])  # type: ignore[arg-type]
            elif op in (0x82, 0x83, 0x84):
                trace.globals.append(Event("EXT", f"<extension>.{arg}", at, resolved=False))
            i += 1 + size
            last = None
        elif op in _SIZED:
            width = _SIZED[op]
            length = int.from_bytes(data[i + 1 : i + 1 + width], "little", signed=op in (ord("T"), 0x8B))
            if length < 0 or i + 1 + width + length > n:
                return
            payload = data[i + 1 + width : i + 1 + width + length]
            i += 1 + width + length
            last = payload.decode("utf-8", "replace") if op in _TEXT else None
            if last is not None:
                strings.append(last)
        elif op in _LINES:
            j = i + 1
            args = []
            for _ in range(_LINES[op]):
                k = data.find(b"\n", j)
                if k < 0:
                    return
                args.append(data[j:k].decode("utf-8", "replace"))
                j = k + 1
            i = j
            last = None
            if op in (ord("c"), ord("i")):
                trace.globals.append(
                    Event("GLOBAL" if op == ord("c") else "INST", f"{args[0]}.{args[1]}", at, True, args[0])
                )
            elif op == ord("p"):
                memo[_int_or(args[0])] = strings[-1] if strings else None
            elif op == ord("g") and isinstance(memo.get(_int_or(args[0])), str):
                strings.append(memo[_int_or(args[0])])  # type: ignore[arg-type]
            elif op in (ord("S"), ord("V")):
                last = args[0].strip("'\"")
                strings.append(last)
        else:
            return  # not an opcode: the rest is not pickle data


def _int_or(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        return -1


# ---------------------------------------------------------------------------------------------
# zip archives (torch.save since 1.6, TorchScript, numpy's npz)
# ---------------------------------------------------------------------------------------------


def _is_pickle_entry(name: str) -> bool:
    return name.lower().endswith(_PICKLE_SUFFIXES)


def _scan_zip(path: str, out: _Streams) -> None:
    try:
        listing = list_archive(path)
    except FormatError as exc:
        out.broken(str(exc).removeprefix(f"{path}: "))
        return
    for problem in listing.ambiguities:
        out.findings.append(Finding(BROKEN, "archive ambiguity", problem))
    prefix = listing.prefix
    chosen = listing.find(prefix + "data.pkl")
    if listing.ambiguities and chosen is not None:
        out.notes.append(
            f"torch's reading: the central directory the end record points to ({chosen.source}), "
            f"{chosen.name} at byte {chosen.header_offset}"
            + (
                " (or another entry of that name: torch's reader picks one by binary search)"
                if len(listing.entries_named(chosen.name)) > 1
                else ""
            )
        )
    everything = [*listing.entries, *listing.others]
    npys = [e for e in everything if e.name.lower().endswith(".npy")]
    if listing.find(prefix + "data.pkl") is None:
        if npys and not any(_is_pickle_entry(e.name) for e in everything):
            out.format = "npz"
        else:
            out.broken("zip archive without data.pkl: not a torch checkpoint")
    # Python source outside TorchScript's code/ is what a torch.package archive imports (and runs)
    sources = [
        e.name for e in listing.entries if e.name.lower().endswith(".py") and "/code/" not in f"/{e.name.lower()}"
    ]
    if sources:
        out.findings.append(
            Finding(
                SUSPICIOUS,
                "python source",
                f"{len(sources)} Python files in the archive "
                f"({', '.join(sources[:3])}): a torch.package archive runs them when loaded",
            )
        )
    # the entry read_zip decodes, when a validate's load follows this scan (torchfile.decodes_shared)
    shared = None
    if sharing_decodes() and chosen is not None and len(listing.entries_named(chosen.name)) == 1:
        shared = chosen
    with open(path, "rb") as f:
        _scan_archive_pickles(f, path, everything, out, listing, shared)
        if out.format == "npz":
            for e in npys:
                _scan_npz_member(f, path, e, out)
        _scan_torchscript_code(f, path, listing, out)


def _scan_archive_pickles(
    f: IO[bytes],
    path: str,
    everything: list[ZipEntry],
    out: _Streams,
    listing: ZipListing | None = None,
    shared: ZipEntry | None = None,
) -> None:
    """Every pickle-bearing entry any reader could choose: each directory's, each local header's.

    ``shared``: the entry :func:`~ckpt_tool.formats.torchfile.read_zip` decodes next; its storages
    are resolved as that reader resolves them, and a decode that passes its checks is left for it.
    """
    candidates: dict[int, ZipEntry] = {}
    for e in everything:
        if _is_pickle_entry(e.name):
            candidates.setdefault(e.header_offset, e)
    names = [e.name for e in candidates.values()]
    for e in candidates.values():
        stream = (
            e.name
            if names.count(e.name) == 1 and e.source.startswith("central")
            else f"{e.name} ({e.source}, local header at {e.header_offset})"
        )
        try:
            data = read_entry(f, e, path, MAX_ENTRY)
        except FormatError as exc:
            out.broken(str(exc).removeprefix(f"{path}: "), stream)
            continue
        intact = crc_ok(e, data)
        if not intact:
            out.findings.append(
                Finding(
                    BROKEN,
                    "archive ambiguity",
                    f"{e.name} has a bad CRC-32: torch does not check it and loads these bytes, zipfile refuses them",
                    stream,
                )
            )
        if e is shared and listing is not None and intact and data_pkl_readable(e, data):
            load, storages, refused = _shared_loader(path, listing, f)
            whole, root = _scan_bytes(out, stream, data, e.compressed_size, load)
            # the reading torch makes, named by the stream: a desync appends a second (straight) one,
            # and readers that disagree on the opcodes leave nothing to share
            trace = next((t for n, t in reversed(out.traces) if n == stream), None)
            if whole and not refused and trace is not None and not trace.desync:
                offer_decoded(path, e, Decoded(root, trace, storages))
        else:
            _scan_bytes(out, stream, data, e.compressed_size)


def _shared_loader(path: str, listing: ZipListing, f: IO[bytes]) -> tuple[Any, dict[str, StorageRef], list[bool]]:
    """read_zip's storage checks for a scan: a storage they refuse is noted (the decode is then not
    shared, and read_zip reports it) and read leniently, so the scan walks on as it always does."""
    strict, storages = strict_loader(path, listing, f)
    lenient = _lenient_persistent_load()
    refused: list[bool] = []

    def load(pid: Any) -> Any:
        if not refused:
            try:
                return strict(pid)
            except FormatError:
                refused.append(True)
        return lenient(pid)

    return load, storages, refused


def _scan_npz_member(f: IO[bytes], path: str, e: ZipEntry, out: _Streams) -> None:
    try:
        data = read_entry(f, e, path, MAX_ENTRY)
    except FormatError as exc:
        out.broken(str(exc).removeprefix(f"{path}: "), e.name)
        return
    _scan_npy_stream(io.BytesIO(data), len(data), out, e.name)


def _scan_torchscript_code(f: IO[bytes], path: str, listing: ZipListing, out: _Streams) -> None:
    code = [e for e in listing.entries if "/code/" in f"/{e.name.lower()}" and e.name.lower().endswith(".py")]
    if not code:
        return
    total, seen, budget = 0, 0, MAX_CODE
    for e in code:
        try:
            source = read_entry(f, e, path, budget).decode("utf-8", "replace")
        except FormatError as exc:
            out.broken(str(exc).removeprefix(f"{path}: "), e.name)
            continue
        budget -= len(source)
        total += 1
        count, found = dangerous_calls(source)
        seen += count
        for call in found:
            out.findings.append(
                Finding(
                    UNSAFE,
                    call.name,
                    f"TorchScript code calls it: {call.reason}; torch.jit.load compiles and runs this code",
                    e.name,
                    "code",
                    call.position,
                )
            )
    out.findings.append(
        Finding(
            SUSPICIOUS,
            "TorchScript code",
            f"{total} TorchScript source files ({seen} calls and "
            "imports) run when torch.jit.load loads the archive; ckpt checks them for file, "
            "process, network and import calls only, so TorchScript is never called safe",
        )
    )


# ---------------------------------------------------------------------------------------------
# plain pickles, the legacy torch format, tar, npy, safetensors
# ---------------------------------------------------------------------------------------------


def _scan_pickle_file(path: str, size: int, out: _Streams, kind: str) -> None:
    """A plain pickle or the legacy torch format: pickles one after another, then storage bytes.

    Legacy files hold five pickles in a row (magic number, protocol, system info, the object, the
    storage keys) and then each storage's bytes; a scanner that reads only the first is a known
    bypass. Bytes after what a loader reads are reported, and their globals recorded.
    """
    with open(path, "rb") as f:
        _scan_pickle_stream(f, size, out, kind)


def _scan_pickle_stream(f: IO[bytes], size: int, out: _Streams, kind: str, label: str = "pickle") -> None:
    storages: dict[str, StorageRef] = {}
    legacy = False
    index = 0
    budget = opcode_budget(size)
    while f.tell() < size:
        start = f.tell()
        index += 1
        name = f"{label} {index}"
        try:
            value = _read_stream(out, name, f, size, budget, _lenient_persistent_load(storages))
        except WorkLimit as exc:
            out.broken(f"{name}: {exc}: {size:,} bytes in all", name)
            return
        except FormatError as exc:
            trace = next(t for n, t in reversed(out.traces) if n == name)
            if index == 1 and kind == fmt.UNKNOWN:
                out.broken("not a recognised model file (no torch zip, safetensors, pickle or legacy torch header)")
            elif index == 1 or legacy:
                out.broken(f"{name}: {exc}", name)  # a stream the loader reads is broken
            else:
                out.findings.append(
                    Finding(
                        SUSPICIOUS,
                        "trailing data",
                        f"{size - start} bytes after the pickle are not one; pickle.load never reads them",
                        "",
                        "",
                        start,
                    )
                )
            f.seek(start)
            _walk_opcodes(f.read(min(size - start, FALLBACK_WINDOW)), trace, start, budget)
            if not trace.globals and not trace.calls:
                out.traces.remove((name, trace))
            return
        if index == 1 and label == "pickle":
            legacy = value == fmt.LEGACY_MAGIC
            out.format = fmt.LEGACY if legacy else fmt.PICKLE
            out.notes.append(
                "legacy torch format: 5 pickles (magic, protocol, sys_info, data, storage keys), then storages"
                if legacy
                else "plain pickle"
            )
        if legacy and index == 5:
            try:
                walk_legacy_storages(f, value, storages, size)
            except FormatError as exc:
                out.broken(str(exc))
                return
            end = f.tell()
            if end < size:
                out.findings.append(
                    Finding(
                        SUSPICIOUS,
                        "trailing data",
                        f"{size - end} bytes after the last storage; torch.load never reads them",
                        "",
                        "",
                        end,
                    )
                )
                _scan_trailing(f, end, size, out)
            return
        if label != "pickle":
            return  # an npy's object array is one pickle
    if legacy:
        out.broken(f"legacy torch file ends after {index} of its 5 pickles (truncated)")


def _scan_trailing(f: IO[bytes], start: int, size: int, out: _Streams) -> None:
    """Bytes after the end of a legacy file: scanned as pickles in case another loader reads them."""
    f.seek(start)
    data = f.read(min(size - start, FALLBACK_WINDOW))
    trace = out.new("trailing data")
    _walk_opcodes(data, trace, start)
    if not trace.globals:
        out.traces.pop()


def _scan_tar(path: str, out: _Streams) -> None:
    """torch's pre-0.4 tar format: each member opens with pickles; the storages' bytes are not walked."""
    import tarfile

    try:
        with tarfile.open(path) as tf:
            members = [m for m in tf.getmembers() if m.isfile() and m.name in _TAR_MEMBERS]
            if not any(m.name in ("pickle", "storages") for m in members):
                out.broken("a tar archive, but not torch's pre-0.4 tar format (no 'pickle' member)")
                return
            for member in members:
                handle = tf.extractfile(member)
                if handle is not None:
                    data = handle.read(FALLBACK_WINDOW)
                    _scan_bytes(out, member.name, data)
    except (tarfile.TarError, OSError, EOFError, ValueError) as exc:
        out.broken(f"corrupt tar archive ({exc})")
        return
    out.findings.append(
        Finding(
            SUSPICIOUS,
            "torch tar format",
            "the pre-0.4 tar format is only partly analysed "
            "(the pickles between storages are not walked); re-save it with a newer torch",
        )
    )


def _scan_npy(path: str, size: int, out: _Streams) -> None:
    with open(path, "rb") as f:
        _scan_npy_stream(f, size, out, "")


def _scan_npy_stream(f: IO[bytes], size: int, out: _Streams, where: str) -> None:
    """A .npy array: its header is read as numpy does; an object array's pickle is scanned."""
    try:
        header = npy.read_header(f)
    except FormatError as exc:
        out.broken(f"{where + ': ' if where else ''}{exc}", where)
        return
    if header.itemsize is None:
        out.notes.append(
            f"{where or 'npy'}: an object array, stored as a pickle (numpy.load(allow_pickle=True) unpickles it)"
        )
        _scan_pickle_stream(f, size, out, fmt.PICKLE, label=f"{where + ' ' if where else ''}object array")
        return
    have = size - header.data_offset
    if have < header.nbytes:
        out.broken(
            f"{where + ': ' if where else ''}array {header.shape} of {header.descr!r} needs {header.nbytes} "
            f"bytes, the file holds {have} (truncated)",
            where,
        )
    else:
        out.notes.append(f"{where or 'npy'}: array {header.shape} of {header.descr!r}, no pickle")


def _scan_safetensors(path: str, out: _Streams) -> None:
    header, defects = header_defects(path)
    for defect in defects:
        out.findings.append(Finding(BROKEN, "safetensors", defect))
    if header is not None:
        out.notes.append(f"{len(header.tensors)} tensors, header checked against {header.file_size} bytes")
    _check_polyglot(path, out)


_IDENTIFIER = re.compile(r"[A-Za-z_][\w.]*")


def _check_polyglot(path: str, out: _Streams) -> None:
    """torch.load reads any file that does not open with ``PK`` as a pickle: a safetensors file whose
    first bytes are also pickle opcodes runs them. Flag it when that reading names a real global.

    Only what the interpreter reads before it stops counts (no fallback walk over tensor bytes)."""
    import os

    size = os.path.getsize(path)
    trial = _Streams()
    with open(path, "rb") as f:
        vm = PickleVM(_lenient_persistent_load(), None, opcode_budget(size))
        for index in range(1, 6):  # the legacy layout's five pickles at most
            trace = trial.new(f"pickle {index}")
            vm.trace = trace
            try:
                value = vm.load(f, size)
            except FormatError:
                break
            if index == 1 and value != fmt.LEGACY_MAGIC:
                break
    named = [
        (n, t)
        for n, t in trial.traces
        if any(_IDENTIFIER.fullmatch(e.name) and e.module and _IDENTIFIER.fullmatch(e.module) for e in t.globals)
    ]
    if not named:
        return
    out.findings.append(
        Finding(
            UNSAFE,
            "safetensors/pickle polyglot",
            "the file is valid safetensors and also a "
            "pickle that names globals: pickle.load, and torch.load(weights_only=False) where "
            "torch does not recognise safetensors, read it as a pickle and run them",
            named[0][0],
            "",
            0,
        )
    )
    out.traces.extend(named)
