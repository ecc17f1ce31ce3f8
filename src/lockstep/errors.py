"""Errors that are the user's to fix, kept apart from our bugs.

The CLI prints a ``LockstepError`` as one line (what happened, the values, the fix) and exits
with code 2; any other exception is a bug in lockstep and keeps its traceback.
"""

from __future__ import annotations

__all__ = ["LockstepError", "DumpError", "DumpWriteError", "UsageError", "MissingExtraError"]


class LockstepError(Exception):
    """A problem with the user's input or environment, reported without a traceback."""


class DumpError(LockstepError):
    """A dump that cannot be read: corrupt, truncated, hostile, or not a dump at all."""

    def __init__(self, path: object, message: str, *, record: int | None = None) -> None:
        where = f"{path}" if record is None else f"{path}, record {record}"
        super().__init__(f"{where}: {message}")
        self.path = path
        self.record = record


class DumpWriteError(LockstepError):
    """The system refused to write a dump (disk full, a file size limit, an I/O error); what
    was written before stays readable."""


class UsageError(LockstepError):
    """Bad arguments: a spec, a pattern or an option that cannot work."""


class MissingExtraError(LockstepError):
    """An optional dependency (torch, transformers, llama.cpp) is not installed."""

    def __init__(self, module: str, extra: str) -> None:
        super().__init__(
            f"this needs the Python package '{module}', which is not installed; "
            f"install it with: pip install 'lockstep[{extra}]'"
        )
