"""The exception hierarchy; the CLI maps each class to a one-line message and an exit code."""

from __future__ import annotations

# the documented exit codes, defined once
EXIT_OK, EXIT_FINDINGS, EXIT_INPUT, EXIT_BUG = 0, 1, 2, 3


class CkptError(Exception):
    """Base class for every error ckpt reports to a user."""

    exit_code = 2
    hint: str | None = None

    def __init__(self, message: str, *, hint: str | None = None) -> None:
        super().__init__(message)
        if hint is not None:
            self.hint = hint


class InputError(CkptError):
    """A file is missing, unreadable, corrupt, truncated or of an unsupported kind."""


class FormatError(InputError):
    """A file's content contradicts its own format (bad header, bad offsets, bad pickle)."""


class LfsPointerError(InputError):
    """The file is a git-lfs pointer: the real file was never fetched."""

    hint = "run `git lfs pull` to fetch it"


class KeyPathError(CkptError):
    """A `--key` path does not name a state dict in the checkpoint."""


class UsageError(CkptError):
    """Arguments that cannot work together or cannot be parsed."""


class ArchError(CkptError):
    """A target architecture cannot be built."""


class OutputError(CkptError):
    """An output cannot be written (exists without --force, is the input, disk error)."""
