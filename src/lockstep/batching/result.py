"""A batched run compared sequence by sequence: each sequence's comparison with its prompt's
solo reference, and the batch's verdict (the worst of them)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ..compare import Comparison

__all__ = ["BatchComparison", "worst_verdict"]

_ORDER = ("match", "drift", "incomplete", "diverged")


def worst_verdict(verdicts: list[str]) -> str:
    """The verdict of several comparisons: diverged over incomplete over drift over match."""
    return max(verdicts, key=_ORDER.index) if verdicts else "incomplete"


@dataclass(frozen=True)
class BatchComparison:
    """Each sequence of the batch against its solo reference."""

    sequences: tuple[Comparison, ...]
    prompts: tuple[tuple[int, ...], ...]
    padding: str | None
    join_at: tuple[int, ...]
    #: what the batch did beyond packing or padding (batching.layout.layout_notes)
    notes: tuple[str, ...] = ()

    @property
    def verdict(self) -> str:
        return worst_verdict([c.verdict for c in self.sequences])

    @property
    def diverged(self) -> list[int]:
        """The sequences whose comparison diverged."""
        return [i for i, c in enumerate(self.sequences) if c.verdict == "diverged"]

    def __bool__(self) -> bool:
        return self.verdict in ("match", "drift")
