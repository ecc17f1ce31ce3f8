"""The checkpoint's errors: a checkpoint that cannot be read, and one tensor that cannot."""

from __future__ import annotations

from ..errors import LockstepError

__all__ = ["CheckpointError", "UnreadableTensor"]


class CheckpointError(LockstepError):
    """A checkpoint that cannot be read: missing, corrupt, truncated or hostile."""

    def __init__(self, path: object, message: str, *, tensor: str | None = None) -> None:
        where = f"{path}" if tensor is None else f"{path}, tensor {tensor!r}"
        super().__init__(f"{where}: {message}")
        self.path = path
        self.tensor = tensor
        self.reason = message  #: what is wrong, without the path


class UnreadableTensor(CheckpointError):
    """One tensor that cannot be read (its dtype, its layout); the others still can."""
