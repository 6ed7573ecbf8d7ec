"""Where ckpt keeps what it learned once and may reuse: target signatures, shape flows, dtype probes."""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from typing import Any


def cache_root() -> str:
    """``$CKPT_CACHE_DIR``, else ``$XDG_CACHE_HOME/ckpt``, else ``~/.cache/ckpt``."""
    return os.environ.get("CKPT_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "ckpt"
    )


def _checksum(key: dict[str, Any], body: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps([key, body], sort_keys=True).encode()).hexdigest()


def read_cached(path: str, key: dict[str, Any]) -> tuple[Any, str]:
    """``(body, "hit")``, or ``(None, "missing" | "corrupt")`` when the entry's key or checksum does not match."""
    try:
        with open(path, encoding="utf-8") as f:
            entry = json.load(f)
    except FileNotFoundError:
        return None, "missing"
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError):
        return None, "corrupt"
    try:
        body = entry["body"]
        if entry["key"] != key or entry["checksum"] != _checksum(key, body):
            return None, "corrupt"
    except (KeyError, TypeError, ValueError):
        return None, "corrupt"
    return body, "hit"


def write_cached(path: str, key: dict[str, Any], body: Any) -> bool:
    """Store an entry atomically (temp file + rename), so a reader never sees half of one."""
    entry = {"key": key, "body": body, "checksum": _checksum(key, body)}
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".json", dir=os.path.dirname(path))
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                json.dump(entry, f)
            os.replace(tmp, path)
        except BaseException:
            os.unlink(tmp)
            raise
    except OSError:
        return False
    return True
