"""``python -m ckpt_tool``: the ``ckpt`` command (torchrun starts finetune-check's processes this way)."""

from __future__ import annotations

import sys

from .cli import run

if __name__ == "__main__":
    sys.exit(run())
