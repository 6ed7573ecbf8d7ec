"""Where ckpt keeps what it learned once and may reuse: target signatures, shape flows, dtype probes."""

from __future__ import annotations

import os


def cache_root() -> str:
    """``$CKPT_CACHE_DIR``, else ``$XDG_CACHE_HOME/ckpt``, else ``~/.cache/ckpt``."""
    return os.environ.get("CKPT_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "ckpt"
    )
