"""The one owner of "is the ``torch`` extra installed": paths that need torch ask here before any work.

The core (reading, scanning, comparing, moving bytes) never needs torch; building a model, training
and loading tensors into a model do. ``find_spec`` answers without importing anything.
"""

from __future__ import annotations

import importlib.util

from .errors import TorchMissingError

EXTRA = "ckpt-tool[torch]"


def has(module: str) -> bool:
    """Whether ``module`` (``torch``, ``torchvision``) can be imported, without importing it."""
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def require_torch(what: str, *, torchvision: bool = False) -> None:
    """Raise :class:`TorchMissingError` naming ``what`` unless torch (and torchvision) can be imported.

    Example:
        >>> require_torch("finetune-check")  # without torch: TorchMissingError, exit 2
    """
    missing = [m for m in ("torch", "torchvision") if (m == "torch" or torchvision) and not has(m)]
    if missing:
        raise TorchMissingError(
            f"{what} needs {' and '.join(missing)}, which {'is' if len(missing) == 1 else 'are'} not installed"
        )


def buildable(spec: str) -> bool:
    """Whether ``--arch spec`` can be built here: torch, plus torchvision for a torchvision name, timm for ``timm:``,
    transformers for ``hf:``."""
    if not has("torch"):
        return False
    if spec.startswith("timm:"):
        return has("timm")
    if spec.startswith("hf:"):
        return has("transformers")
    return ":" in spec or has("torchvision")
