"""Recognise a model file by its content, never by its extension."""

from __future__ import annotations

import os
import zipfile

from ..errors import InputError

ZIP = "torch-zip"
TORCHSCRIPT = "torchscript"
LEGACY = "torch-legacy"
LEGACY_TAR = "torch-legacy-tar"
SAFETENSORS = "safetensors"
SHARDED = "sharded"
PICKLE = "pickle"
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
        return SHARDED
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
    if len(head) >= 262 and head[257:262] == b"ustar":
        return LEGACY_TAR
    if len(head) >= 9 and head[8:9] == b"{":
        return SAFETENSORS
    if head[0] == 0x80 and len(head) > 1 and head[1] <= 5:
        return PICKLE
    if head[:1] in (b"(", b"]", b"}", b"c", b"N", b"I", b"S", b"V", b"l", b"d"):
        return PICKLE  # protocol 0/1 pickles have no header; the reader decides
    return UNKNOWN


def _zip_kind(path: str) -> str:
    try:
        with zipfile.ZipFile(path) as zf:
            names = zf.namelist()
    except (zipfile.BadZipFile, OSError, ValueError):
        return ZIP  # the reader reports the defect precisely
    for name in names:
        if name.endswith("constants.pkl") or "/code/" in name:
            return TORCHSCRIPT
    return ZIP
