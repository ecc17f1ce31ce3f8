"""A dump seen through records built from parts of other records: the ranks of a
tensor-parallel recording merged into one (align.unshard), or the chunks of a prefill fed in
several forwards joined into one step (align.chunks).

Each composed record names its parts, each a record of some opened dump, and one rule:

* ``cat``: the parts concatenated along ``dim`` (column-parallel shards, a prefill's chunks);
* ``stack``: the parts stacked along a new first dim (a prompt fed one token per step, each
  step's record one token's vector);
* ``sum``: the parts added (in float: row-parallel partial sums);
* ``one``: part ``pick`` alone (a replica, the state after a prefill's last chunk);
* ``slice``: the one part from index ``start`` to ``stop`` along ``dim`` (a prefill's tokens
  after the prefix the other side took from its cache; a decode step's rows without its
  rejected draft tokens).

Only the parts of the record being read are in memory; the dumps they come from keep owning
their mappings (close this dump to close them).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from ..store.reader import Dump, Record

__all__ = ["Parts", "ComposedDump", "bounds", "slice_errors"]

RULES = ("cat", "stack", "sum", "one", "slice")


@dataclass(frozen=True)
class Parts:
    """How one composed record is read from its parts."""

    rule: str  #: "cat", "stack", "sum", "one" or "slice"
    sources: tuple[tuple[Dump, Record], ...]
    dim: int = 0  #: cat, slice: the dimension concatenated, or cut (non-negative)
    pick: int = 0  #: one: the part read
    start: int = 0  #: slice: the first index kept along dim
    stop: int | None = None  #: slice: the index after the last kept (None: the end)

    @property
    def offset(self) -> int:
        """The composed record's stand-in ``offset``: negative (never a place in a data file),
        the same for two records composed the same way of the same data (a module returning
        its child's tensor: pairing sets such repeats aside), else different."""
        key = (self.rule, tuple(r.offset for _, r in self.sources), self.dim, self.pick,
               self.start, self.stop)
        return -1 - (hash(key) & ((1 << 62) - 1))


def bounds(shapes: Sequence[tuple[int, ...]], dim: int) -> tuple[int, ...]:
    """Where each part starts along ``dim`` once concatenated, then the end."""
    edges = [0]
    for s in shapes:
        edges.append(edges[-1] + s[dim])
    return tuple(edges)


def slice_errors(ref: np.ndarray, cand: np.ndarray, dim: int,
                 edges: Sequence[int]) -> tuple[tuple[int, float], ...]:
    """(part, relative L2 error) of each part's slice along ``dim`` (``edges`` as ``bounds``
    gives them): which shard, or which chunk, holds an error."""
    out = []
    for k in range(len(edges) - 1):
        sl = [slice(None)] * ref.ndim
        sl[dim] = slice(edges[k], edges[k + 1])
        a = ref[tuple(sl)].astype(np.float64)
        b = cand[tuple(sl)].astype(np.float64)
        scale = float(np.linalg.norm(a))
        diff = float(np.linalg.norm(a - b))
        out.append((k, diff / scale if scale > 0 else (0.0 if diff == 0 else math.inf)))
    return tuple(out)


class ComposedDump(Dump):
    """Records read from parts of other dumps' records (module doc). ``owners``: the dumps
    the parts come from, trimmed and closed with this one."""

    def __init__(self, path: Path, header: dict[str, Any], records: list[Record],
                 meta: dict[str, Any], end: dict[str, Any] | None,
                 parts: dict[int, Parts], owners: Sequence[Dump]) -> None:
        super().__init__(path, header, records, meta, end, 0)
        self.owners = list(owners)
        #: steps that go on with their sequence though fed several ids (align.steps)
        self.continues: frozenset[int] = frozenset().union(
            *(getattr(d, "continues", frozenset()) for d in owners))
        self._parts = parts  # composed record's seq -> its parts

    def raw(self, record: Record) -> np.ndarray:
        parts = self._parts[record.seq]
        if parts.rule == "cat":
            return np.concatenate([d.raw(r) for d, r in parts.sources], axis=parts.dim)
        if parts.rule == "stack":
            return np.stack([d.raw(r) for d, r in parts.sources])
        if parts.rule == "sum":
            total = np.zeros(record.shape, dtype=np.float64 if record.dtype == "float64"
                             else np.float32)
            for d, r in parts.sources:
                total += d.read(r)
            return total
        d, r = parts.sources[parts.pick]
        if parts.rule == "slice":
            index = [slice(None)] * len(r.shape)
            index[parts.dim] = slice(parts.start, parts.stop)
            return d.raw(r)[tuple(index)]
        return d.raw(r)

    def stats(self, record: Record) -> dict[str, Any]:
        parts = self._parts[record.seq]
        if parts.rule == "one":
            d, r = parts.sources[parts.pick]
            return d.stats(r)
        return super().stats(record)

    def release(self, record: Record) -> None:
        for d, r in self._parts[record.seq].sources:
            d.release(r)

    def trim(self) -> None:
        for d in self.owners:
            d.trim()

    def close(self) -> None:
        for d in self.owners:
            d.close()
