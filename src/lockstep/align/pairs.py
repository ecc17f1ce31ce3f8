"""What aligning two dumps gives: the pairs of records to compare, and what stayed unpaired.

``align.pairing`` makes them; ``align.verify`` re-pairs by values; the comparison, the report
and the mapping writer read them.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..store.reader import Record

__all__ = ["Pair", "Alignment"]


@dataclass(frozen=True)
class Pair:
    """A reference record and the candidate record it is compared with."""

    ref: Record
    cand: Record
    how: str  #: "name", "mapping", "table", "normalized" or "structure": the pass that paired
    canonical: str | None = None  #: the canonical name, when a name table paired them
    ref_transform: str | None = None  #: layout transform applied to the reference tensor
    cand_transform: str | None = None  #: and to the candidate tensor
    confidence: float = 1.0  #: 1 for names, tables and mapping; structural pairs less
    evidence: str = ""  #: why they were paired, for structural pairs


@dataclass(frozen=True)
class Alignment:
    """Every pair, in step and reference capture order, and what could not be paired."""

    pairs: tuple[Pair, ...]
    ref_only: tuple[Record, ...]
    cand_only: tuple[Record, ...]
    tables: tuple[str, str] | None = None  #: the name tables used (reference, candidate)
    ignored: int = 0  #: records left out by the mapping file
    aliased: int = 0  #: unpaired records that repeat another record's data (not listed)

    @property
    def low_confidence(self) -> tuple[Pair, ...]:
        return tuple(p for p in self.pairs if p.confidence < 0.6)
