"""ckpt: PyTorch checkpoint surgery and inspection, read safely and header-only."""

from __future__ import annotations

__version__ = "0.1.0"

from .checkpoint import Checkpoint, TensorRef  # noqa: E402
from .errors import CkptError  # noqa: E402
from .reader import open_checkpoint  # noqa: E402

__all__ = ["Checkpoint", "CkptError", "TensorRef", "open_checkpoint", "__version__"]
