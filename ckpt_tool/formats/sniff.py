"""Recognise a model file by its content, never by its extension."""

from __future__ import annotations

import os

from ..errors import FormatError, InputError

ZIP = "torch-zip"
TORCHSCRIPT = "torchscript"
LEGACY = "torch-legacy"
LEGACY_TAR = "torch-legacy-tar"
SAFETENSORS = "safetensors"
SHARDED = "sharded"
DCP = "dcp"  # a torch.distributed.checkpoint directory (.metadata and *.distcp)
DCP_SHARD = "dcp-shard"  # one .distcp file of such a directory
PICKLE = "pickle"
NPY = "npy"
LFS_POINTER = "git-lfs-pointer"
UNKNOWN = "unknown"

LFS_SIGNATURE = b"version https://git-lfs.github.com/spec/"
LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
# the legacy torch format opens with a protocol-2 pickle of LEGACY_MAGIC: PROTO 2, LONG1 10 bytes
LEGACY_PREFIX = b"\x80\x02\x8a\x0a" + LEGACY_MAGIC.to_bytes(10, "little")


def sniff(path: str) -> str:
    """Name the format of ``path`` (a file, or a directory holding a sharded index).

    Example:
        >>> sniff("fixtures/tiny_cnn.pth")
        'torch-zip'
    """
    if os.path.isdir(path):
        return DCP if os.path.isfile(os.path.join(path, ".metadata")) else SHARDED
    if path.endswith(".distcp"):
        return DCP_SHARD
    if path.endswith(".index.json"):
        return SHARDED
    try:
        with open(path, "rb") as f:
            head = f.read(512)
    except FileNotFoundError:
        raise InputError(f"{path}: no such file") from None
    except IsADirectoryError:
        return SHARDED
    except OSError as exc:
        raise InputError(f"{path}: cannot be read ({exc.strerror})") from None
    return sniff_bytes(head, path)


def sniff_bytes(head: bytes, path: str = "") -> str:
    if not head:
        return UNKNOWN
    if head.startswith(b"PK\x03\x04") or head.startswith(b"PK\x05\x06"):
        return _zip_kind(path) if path else ZIP
    if head.startswith(LFS_SIGNATURE):
        return LFS_POINTER
    if head.startswith(LEGACY_PREFIX):
        return LEGACY
    if head.startswith(NPY_MAGIC):
        return NPY
    if is_tar_header(head):
        return LEGACY_TAR  # torch.load tries tarfile first: any header tarfile accepts, ustar magic or not
    if len(head) >= 9 and head[8:9] == b"{":
        return SAFETENSORS
    if head[0] == 0x80 and len(head) > 1 and head[1] <= 5:
        return PICKLE
    if head[:1] in (b"(", b"]", b"}", b"c", b"N", b"I", b"S", b"V", b"l", b"d"):
        return PICKLE  # protocol 0/1 pickles have no header; the reader decides
    # any other opcode can open a pickle too (pickle.load needs no PROTO): UNKNOWN files are still
    # read as pickles by scan, and its directory walk tries every file starting with one
    return UNKNOWN


NPY_MAGIC = b"\x93NUMPY"
# every opcode of protocols 0-5 (pickletools.opcodes); a stream may begin with any of them
PICKLE_OPCODES = frozenset(
    b"()012BCFGIJKLMNPQRSTUVX]abcdeghijlopqrstu}.\x80\x81\x82\x83\x84\x85\x86\x87\x88"
    b"\x89\x8a\x8b\x8c\x8d\x8e\x8f\x90\x91\x92\x93\x94\x95\x96\x97\x98"
)


def is_tar_header(head: bytes) -> bool:
    """A tar header block as ``tarfile`` checks one: the header checksum, with or without ``ustar`` magic."""
    if len(head) < 512 or not head[:100].strip(b"\0"):
        return False
    field = head[148:156].split(b"\0", 1)[0].strip()
    try:
        chksum = int(field, 8)
    except ValueError:
        return False
    block = head[:148] + b" " * 8 + head[156:512]
    return chksum in (sum(block), sum(b - 256 if b > 127 else b for b in block))


def _zip_kind(path: str) -> str:
    from .ziparchive import list_archive

    try:
        names = list_archive(path).names()
    except (FormatError, InputError):
        return ZIP  # the reader reports the defect precisely
    # one search of all the names at once (a file of 100,000 storages has as many entries), then
    # name by name where it finds something (a name may hold a newline itself)
    text = "\n".join(names).lower() + "\n"
    if ("/code/" in text or "constants.pkl\n" in text) and any(
        name.lower().endswith("constants.pkl") or "/code/" in name.lower() for name in names
    ):
        return TORCHSCRIPT
    return ZIP
