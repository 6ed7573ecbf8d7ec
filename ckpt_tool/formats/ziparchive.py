"""Our own zip reader: the archive as torch's reader (miniz) sees it, and every way another reader could.

Readers disagree on hostile archives, and the attacker chooses which one a scanner trusts. torch's
miniz takes the last end-of-central-directory record, follows its central-directory offset as
written, finds names case-insensitively, takes the first of two equal names, ignores CRCs, local
header names and "version needed to extract". Python's ``zipfile`` finds the central directory
right before that record (shifting every offset when the two disagree), is case-sensitive, takes
the last of two equal names, checks local names, and refuses versions above 6.3. Streaming readers
follow local headers from the start of the file. :func:`list_archive` returns torch's view for
reading, every other entry any of those readers could choose, and each disagreement it found.
Nothing here reads tensor bytes: only headers, and the entries a caller asks for.
"""

from __future__ import annotations

import collections
import functools
import mmap
import os
import struct
import zlib
from dataclasses import dataclass, field
from typing import IO, NamedTuple

from ..errors import FormatError, InputError

EOCD_SIG, EOCD64_SIG, LOC64_SIG = b"PK\x05\x06", b"PK\x06\x06", b"PK\x06\x07"
CD_SIG, LOCAL_SIG, DESCRIPTOR_SIG = b"PK\x01\x02", b"PK\x03\x04", b"PK\x07\x08"
MAX_COMMENT = 0xFFFF
MAX_CENTRAL_DIRECTORY = 256 << 20
MAX_ENTRIES = 1_000_000
STORED, DEFLATED, BZIP2, LZMA = 0, 8, 12, 14
ZIPFILE_MAX_VERSION = 63  # zipfile.MAX_EXTRACT_VERSION


class ZipEntry(NamedTuple):
    """One entry as a central directory (or a local header) describes it."""

    name: str
    header_offset: int  # where its local header is, as the reader that lists it computes it
    method: int
    flags: int
    crc: int
    compressed_size: int
    size: int
    version_needed: int
    source: str  # "central directory at N", "local header"

    @property
    def encrypted(self) -> bool:
        return bool(self.flags & 1)


@dataclass(frozen=True)
class ZipListing:
    """``entries``: torch's central directory, in order. ``others``: entries only other readers list."""

    path: str
    file_size: int
    entries: tuple[ZipEntry, ...]
    others: tuple[ZipEntry, ...]
    ambiguities: tuple[str, ...]
    _index: dict[str, ZipEntry] = field(default_factory=dict, compare=False, repr=False)
    # lower-cased names more than one entry has (the rest are found by ``_index`` alone)
    _shared: frozenset[str] = field(default=frozenset(), compare=False, repr=False)
    # header offset -> the local header's length, for the headers the chain read (all, when the
    # archive is well formed): a storage's bytes are placed without reading its header again (the
    # length, not the data's offset: a length under 257 is one of Python's shared small ints)
    _header_len: dict[int, int] = field(default_factory=dict, compare=False, repr=False)

    @property
    def prefix(self) -> str:
        """torch's archive folder: the first entry's name up to its first '/'."""
        first = self.entries[0].name if self.entries else ""
        return first.split("/", 1)[0] + "/" if "/" in first else ""

    def find(self, name: str) -> ZipEntry | None:
        """The entry named ``name`` ignoring case, as torch's reader matches names; the first of several
        (torch's own choice among them follows a binary search: see :meth:`entries_named`)."""
        if not self._index:
            for e in self.entries:
                self._index.setdefault(e.name.lower(), e)
        return self._index.get(name.lower())

    def entries_named(self, name: str) -> list[ZipEntry]:
        """Every entry named ``name`` ignoring case: more than one, and readers may choose differently."""
        want = name.lower()
        if self._index and want not in self._shared:
            found = self._index.get(want)
            return [found] if found is not None else []
        return [e for e in self.entries if e.name.lower() == want]

    def names(self) -> list[str]:
        return [e.name for e in self.entries]

    def data_start(self, f: IO[bytes], e: ZipEntry, path: str) -> int:
        """:func:`data_offset` of ``e``, from the local header the listing read already when it did."""
        length = self._header_len.get(e.header_offset)
        return e.header_offset + length if length is not None else data_offset(f, e, path)


def _u16(b: bytes, o: int) -> int:
    return int.from_bytes(b[o : o + 2], "little")


def _u32(b: bytes, o: int) -> int:
    return int.from_bytes(b[o : o + 4], "little")


def _u64(b: bytes, o: int) -> int:
    return int.from_bytes(b[o : o + 8], "little")


def _decode_name(raw: bytes, flags: int) -> str:
    # undecodable bytes are kept (as surrogates): miniz compares names as bytes
    return raw.decode("utf-8", "surrogateescape") if flags & 0x800 else raw.decode("cp437")


def undecodable(name: str) -> bool:
    """A name flagged UTF-8 that is not (zipfile refuses the archive; torch reads it)."""
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


def _zip64_extra(extra: bytes, fields: list[int]) -> list[int]:
    """Replace the 0xFFFFFFFF sizes and offset with their zip64 values (extra field 0x0001)."""
    i = 0
    while i + 4 <= len(extra):
        tag, size = _u16(extra, i), _u16(extra, i + 2)
        if tag == 1:
            data, j = extra[i + 4 : i + 4 + size], 0
            out = list(fields)
            for k, v in enumerate(fields):
                if v == 0xFFFFFFFF and j + 8 <= len(data):
                    out[k] = _u64(data, j)
                    j += 8
            return out
        i += 4 + size
    return fields


class _EndRecord(NamedTuple):
    position: int
    entries: int
    cd_size: int
    cd_offset: int
    zip64_at: int | None  # where miniz reads the zip64 record (the locator's offset)
    zip64_before: int | None  # where zipfile reads it (right before the locator)


def _end_records(f: IO[bytes], size: int) -> list[_EndRecord]:
    """Every end-of-central-directory record in the file's tail, the last (the one readers use) first."""
    start = max(0, size - (MAX_COMMENT + 22 + 20 + 56))
    f.seek(start)
    tail = f.read(size - start)
    out: list[_EndRecord] = []
    i = tail.rfind(EOCD_SIG)
    while i >= 0:
        if i + 22 <= len(tail):
            count, cd_size, cd_offset = _u16(tail, i + 10), _u32(tail, i + 12), _u32(tail, i + 16)
            at = before = None
            if i >= 20 and tail[i - 20 : i - 16] == LOC64_SIG:
                at = _u64(tail, i - 12)
                before = start + i - 20 - 56
                record = _read_at(f, at, 56)
                if record[:4] == EOCD64_SIG:
                    count, cd_size, cd_offset = _u64(record, 32), _u64(record, 40), _u64(record, 48)
            out.append(_EndRecord(start + i, count, cd_size, cd_offset, at, before))
        i = tail.rfind(EOCD_SIG, 0, i)
    return out


def _read_at(f: IO[bytes], offset: int, n: int) -> bytes:
    if offset < 0:
        return b""
    if isinstance(f, mmap.mmap):  # a mapped file cannot seek past its end; a slice there is empty
        return f[offset : offset + n]
    f.seek(offset)
    return f.read(n)


def _central_directory(
    f: IO[bytes], offset: int, size: int, shift: int, file_size: int, count: int
) -> list[ZipEntry] | None:
    """The entries of the central directory at ``offset``; None when no directory starts there."""
    if offset < 0 or size > MAX_CENTRAL_DIRECTORY or offset + size > file_size or count > MAX_ENTRIES:
        return None
    data: bytes | mmap.mmap
    if isinstance(f, mmap.mmap):  # read in place: a directory of 100,000 entries is not copied
        data, i, end = f, offset, offset + size
    else:
        data = _read_at(f, offset, size)
        i, end = 0, len(data)
    if size < 4 or data[i : i + 4] != CD_SIG:
        return [] if count == 0 and size == 0 else None
    entries: list[ZipEntry] = []
    source = f"central directory at {offset}"
    unpack = _CD_HEADER.unpack_from
    new, add = tuple.__new__, entries.append  # (a named tuple's own __new__ is Python code)
    last = end - 46
    for _ in range(MAX_ENTRIES):
        if i > last:
            break
        sig, needed, flags, method, crc, csize, usize, nlen, xlen, clen, local = unpack(data, i)
        if sig != CD_SIG:
            break
        i += 46
        stop = i + nlen
        raw_name = data[i : stop if stop <= end else end]
        # names are nearly always ASCII, which both encodings read alike
        name = raw_name.decode("ascii") if raw_name.isascii() else _decode_name(raw_name, flags)
        if xlen and 0xFFFFFFFF in (usize, csize, local):  # torch pads every entry's extra field: zip64 is rare
            extra = data[min(stop, end) : min(stop + xlen, end)]
            usize, csize, local = _zip64_extra(extra, [usize, csize, local])
        add(new(ZipEntry, (name, local + shift, method, flags, crc, csize, usize, needed, source)))
        i = stop + xlen + clen
    return entries


# a central directory header (46 bytes): signature, version made by (skipped), version needed, flags,
# method, time and date (skipped), crc, sizes, name/extra/comment lengths, disk and attributes
# (skipped), local header offset; the fields no reader here uses are not unpacked (no int made for them)
_CD_HEADER = struct.Struct("<4s2xHHH4xIIIHHH8xI")
# a local header (30 bytes): signature, version needed, flags, method, time and date (skipped), crc,
# sizes, name/extra lengths
_LOCAL_HEADER = struct.Struct("<4sHHH4xIIIHH")


def list_archive(path: str) -> ZipListing:
    """Read every central directory and local header of a zip; raise FormatError when none is usable."""
    try:
        st = os.stat(path)
        return _list_cached(path, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
    except OSError as exc:
        raise InputError(f"{path}: cannot be read ({exc.strerror or exc})") from None


def list_stream(f: IO[bytes], path: str, size: int) -> ZipListing:
    """List a zip read from an open stream of ``size`` bytes (an archive embedded in a larger file)."""
    return _list(f, path, size)


@functools.lru_cache(maxsize=8)
def _list_cached(path: str, size: int, mtime_ns: int, ctime_ns: int) -> ZipListing:
    # sniffing and reading one file list it twice; the size and time stamps tell a changed file apart
    # (ctime too: an mtime set back after a rewrite in place does not hide the change)
    del mtime_ns, ctime_ns
    with open(path, "rb") as f:
        if size == 0:
            return _list(f, path, size)
        # mapped, the tens of thousands of small header reads are slices rather than system calls
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mapped:
            return _list(mapped, path, size)  # type: ignore[arg-type]


def _list(f: IO[bytes], path: str, size: int) -> ZipListing:
    ends = _end_records(f, size)
    if not ends:
        raise FormatError(f"{path}: corrupt zip archive (File is not a zip file)")
    ambiguities: list[str] = []
    views: list[tuple[str, list[ZipEntry]]] = []
    valid_ends = 0
    for k, end in enumerate(ends):
        before = len(views)
        # miniz: the offset as written; zipfile: the directory right before the end record, every offset shifted
        zipfile_at = (end.zip64_before if end.zip64_before is not None else end.position) - end.cd_size
        read: dict[tuple[int, int], list[ZipEntry] | None] = {}
        for who, offset, shift in (("torch", end.cd_offset, 0), ("zipfile", zipfile_at, zipfile_at - end.cd_offset)):
            if (offset, shift) not in read:  # the two readers agree on a well-formed archive: read it once
                read[offset, shift] = _central_directory(f, offset, end.cd_size, shift, size, end.entries)
            entries = read[offset, shift]
            if entries is not None:
                views.append((f"{who}{'' if k == 0 else f' (end record at {end.position})'}", entries))
        valid_ends += len(views) > before  # a signature in tensor bytes or a comment leads to no directory
    if not views or not views[0][0].startswith("torch"):
        raise FormatError(f"{path}: corrupt zip archive (the central directory is missing or truncated)")
    torch_entries = views[0][1]
    if valid_ends > 1:
        ambiguities.append(f"{valid_ends} end-of-central-directory records (readers may take different ones)")
    distinct = {id(entries): entries for _, entries in views}  # one list when both readers read one directory
    if (
        len(distinct) > 1
        and len({tuple((e.name, e.header_offset) for e in entries) for entries in distinct.values()}) > 1
    ):
        ambiguities.append("torch and Python's zipfile read different central directories")
    # torch's case-insensitive lookup: the first entry of each lower-cased name (a name that is
    # lower case already is its own key: no second copy of 100,000 names)
    index = {(e.name if e.name.islower() else e.name.lower()): e for e in reversed(torch_entries)}
    folded: dict[str, set[str]] = {}  # lower-cased names several entries share: their spellings
    if len(index) < len(torch_entries):  # some name repeats, at least ignoring case
        counts = collections.Counter(e.name for e in torch_entries)
        dupes = sorted(n for n, c in counts.items() if c > 1)
        if dupes:
            ambiguities.append(
                f"duplicate entry names ({', '.join(dupes[:3])}): readers choose differently among "
                "them (zipfile takes the last)"
            )
        for e in torch_entries:
            first = index[e.name.lower()]
            if first is not e:
                folded.setdefault(e.name.lower(), {first.name}).add(e.name)
        clashes = sorted(" / ".join(sorted(v)) for v in folded.values() if len(v) > 1)
        if clashes:
            ambiguities.append(
                f"entry names that differ only in case ({clashes[0]}): torch finds names "
                "case-insensitively, zipfile exactly"
            )
    bad = [e.name for e in torch_entries if not e.name.isascii() and undecodable(e.name)]
    if bad:
        ambiguities.append(
            f"entry name {bad[0]!r} is flagged UTF-8 but is not: Python's zipfile refuses the archive, torch reads it"
        )
    high = [e.name for e in torch_entries if e.version_needed > ZIPFILE_MAX_VERSION]
    if high:
        ambiguities.append(
            f"'version needed to extract' above 6.3 ({high[0]}): Python's zipfile refuses the archive, torch reads it"
        )
    unlisted, renamed, visited, offsets = _local_chain(f, size, torch_entries)
    others: list[ZipEntry] = []
    if unlisted or any(entries is not torch_entries for _, entries in views[1:]):
        seen = {(e.name, e.header_offset) for e in torch_entries}
        for _, entries in views[1:]:
            for e in entries:
                if (e.name, e.header_offset) not in seen:
                    seen.add((e.name, e.header_offset))
                    others.append(e)
        for e in unlisted:
            ambiguities.append(
                f"local header at {e.header_offset} ({e.name}) is in no central directory (a streaming reader reads it)"
            )
            if (e.name, e.header_offset) not in seen:
                seen.add((e.name, e.header_offset))
                others.append(e)
    for e in torch_entries if renamed or len(visited) < offsets else ():
        # the chain read most local headers already; one it did not reach is read here
        local = renamed.get(e.header_offset) if e.header_offset in visited else _local_name(f, e)
        if local is not None and local != e.name:
            ambiguities.append(
                f"entry {e.name!r} is named {local!r} in its local header (torch ignores it, zipfile refuses it)"
            )
    return ZipListing(
        path,
        size,
        tuple(torch_entries),
        tuple(others),
        tuple(dict.fromkeys(ambiguities)),
        index,
        frozenset(folded),
        visited,
    )


def _local_name(f: IO[bytes], e: ZipEntry) -> str | None:
    head = _read_at(f, e.header_offset, 30)
    if len(head) != 30 or head[:4] != LOCAL_SIG:
        return None
    return _decode_name(_read_at(f, e.header_offset + 30, _u16(head, 26)), _u16(head, 6))


def _local_chain(
    f: IO[bytes], size: int, listed: list[ZipEntry]
) -> tuple[list[ZipEntry], dict[int, str], dict[int, int], int]:
    """Local headers one after another from the start, as a streaming reader meets them. Sizes come
    from the local header, or from the central directory when the header defers them to a descriptor.

    Returns the headers no central directory lists, the local names (by offset) of the listed ones
    whose local name may differ from their directory name, the offsets of the listed headers met
    (each with its header's length), and how many distinct offsets the listed entries have.
    """
    by_offset = {e.header_offset: e for e in listed}
    shared: set[int] = set()  # offsets several entries point at: their local name is kept to compare with each
    if len(by_offset) < len(listed):
        seen: set[int] = set()
        for e in listed:
            if e.header_offset in seen:
                shared.add(e.header_offset)
            seen.add(e.header_offset)
    unlisted: list[ZipEntry] = []
    renamed: dict[int, str] = {}
    visited: dict[int, int] = {}
    pos = 0
    unpack = _LOCAL_HEADER.unpack
    # a mapped file is sliced in place (nearly every archive): no call per header read
    mapped = isinstance(f, mmap.mmap)
    get = by_offset.get
    for _ in range(MAX_ENTRIES):
        head = f[pos : pos + 30] if mapped else _read_at(f, pos, 30)  # type: ignore[index]
        if len(head) != 30:
            break
        sig, needed, flags, method, crc, csize, usize, nlen, xlen = unpack(head)
        if sig != LOCAL_SIG:
            break
        start = pos + 30
        raw_name = f[start : start + nlen] if mapped else _read_at(f, start, nlen)  # type: ignore[index]
        name = raw_name.decode("ascii") if raw_name.isascii() else _decode_name(raw_name, flags)
        known = get(pos)
        if known is not None:
            csize = known.compressed_size
            visited[pos] = 30 + nlen + xlen
            if name != known.name or pos in shared:
                renamed[pos] = name
        else:
            if xlen and 0xFFFFFFFF in (usize, csize):
                usize, csize = _zip64_extra(_read_at(f, pos + 30 + nlen, xlen), [usize, csize])
            if flags & 8 and csize == 0:
                break  # size deferred to a data descriptor and no directory entry: cannot step over it
            unlisted.append(ZipEntry(name, pos, method, flags, crc, csize, usize, needed, "local header"))
        nxt = start + nlen + xlen + csize
        if flags & 8:  # a data descriptor follows (torch writes one): crc and sizes, 4 bytes each or zip64's 8
            at = f[nxt : nxt + 4] if mapped else _read_at(f, nxt, 4)  # type: ignore[index]
            base = nxt + (4 if at == DESCRIPTOR_SIG else 0)
            for length in (12, 20):
                after = base + length
                sig = f[after : after + 4] if mapped else _read_at(f, after, 4)  # type: ignore[index]
                if sig in (LOCAL_SIG, CD_SIG):
                    nxt = base + length
                    break
            else:
                break
        if nxt <= pos or nxt > size:
            break
        pos = nxt
    return unlisted, renamed, visited, len(by_offset)


def data_offset(f: IO[bytes], e: ZipEntry, path: str) -> int:
    """Where an entry's bytes start: after its local header's name and extra field."""
    head = _read_at(f, e.header_offset, 30)
    if len(head) != 30 or head[:4] != LOCAL_SIG:
        raise FormatError(f"{path}: zip entry {e.name!r} has a bad local header")
    return e.header_offset + 30 + _u16(head, 26) + _u16(head, 28)


def read_entry(f: IO[bytes], e: ZipEntry, path: str, max_size: int) -> bytes:
    """An entry's bytes, decompressed, at most ``max_size`` of them; CRCs are not checked (torch does not)."""
    if e.encrypted:
        raise FormatError(f"{path}: zip entry {e.name!r} is encrypted (torch and zipfile refuse to read it)")
    if e.size > max_size:
        raise FormatError(f"{path}: zip entry {e.name!r} claims {e.size} bytes, over the {max_size}-byte limit")
    start = data_offset(f, e, path)
    if start + e.compressed_size > os.fstat(f.fileno()).st_size:
        raise FormatError(f"{path}: zip entry {e.name!r} extends past the end of the file (truncated)")
    raw = _read_at(f, start, e.compressed_size)
    import lzma  # torch writes stored entries: the other codecs load only for archives that use them

    try:
        if e.method == STORED:
            return raw
        if e.method == DEFLATED:
            d = zlib.decompressobj(-15)
            data = d.decompress(raw, max_size + 1)
        elif e.method == BZIP2:
            import bz2

            data = bz2.BZ2Decompressor().decompress(raw, max_size + 1)
        elif e.method == LZMA:
            if len(raw) < 4:
                raise lzma.LZMAError("lzma header missing")
            psize = _u16(raw, 2)
            filt = lzma._decode_filter_properties(lzma.FILTER_LZMA1, raw[4 : 4 + psize])  # type: ignore[attr-defined]
            data = lzma.LZMADecompressor(lzma.FORMAT_RAW, filters=[filt]).decompress(raw[4 + psize :], max_size + 1)
        else:
            raise FormatError(
                f"{path}: zip entry {e.name!r} uses compression method {e.method}, which no reader ckpt knows handles"
            )
    except (zlib.error, lzma.LZMAError, OSError, EOFError, ValueError) as exc:
        raise FormatError(f"{path}: zip entry {e.name!r} has corrupt compressed data ({exc})") from None
    if len(data) > max_size:
        raise FormatError(f"{path}: zip entry {e.name!r} inflates past the {max_size}-byte limit")
    return data


def crc_ok(e: ZipEntry, data: bytes) -> bool:
    return zlib.crc32(data) & 0xFFFFFFFF == e.crc
