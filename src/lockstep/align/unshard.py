"""Merging the ranks of a tensor-parallel recording into one dump, record by record.

Each record key ``(step, name, call)`` that every rank recorded is merged by one rule:

* ``col``: column-parallel outputs (q, k, v, gate, up split on the last dim): concatenated;
* ``row``: row-parallel partial sums before the all-reduce: summed (in float);
* ``replicated``: the same tensor on every rank: one copy (the one farthest from the other
  side's record when replicas differ; the ranks that differ are findings).

The rule comes from the record's ``shard`` field (``lockstep.probe(name, t, shard=("col",
-1))``, docs/format.md "Ranks") or is detected from shapes and values against the other
side's record of the same name. A key that no rule fits, or that some rank lacks, is left out
of the merged dump and listed as undecided: the comparison is then incomplete, never a match.
Only the ranks' records of the key being read are in memory (numpy only).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np

from ..display import safe
from ..store.dtypes import lookup
from ..store.ranks import is_ranked, open_ranks
from ..store.reader import Dump, Record, open_dump
from .composed import ComposedDump, Parts, bounds, slice_errors
from .layouts import relative_error

if TYPE_CHECKING:
    from .mapping import MappingFile

__all__ = ["Merge", "RankMerge", "open_side", "merge_ranks", "shard_blame"]

RULES = ("col", "row", "replicated")
_FIT = 1e-3  # a sum or a replica this close to the other side's record fits it outright
_NEARER = 0.5  # else one fit must be at most half the other's error to be taken
_WIDE = ("float64", "int64", "uint64", "int32", "uint32")  # read as float64 (to_float)


@dataclass(frozen=True)
class Merge:
    """How the ranks' records of one key were merged (or why they were not)."""

    step: int
    name: str
    call: int
    rule: str | None  #: "col", "row", "replicated"; None: undecided (left uncompared)
    how: str  #: "annotated" (the record's shard field), "mapping" (a [shard] rule of the
    #: mapping file) or "detected"
    dim: int = 0  #: col: the concatenated dimension (non-negative)
    bounds: tuple[int, ...] = ()  #: col: where each rank's shard starts along dim, then the end
    why: str = ""  #: undecided: the reason; detected: what fitted
    differs: tuple[tuple[int, float], ...] = ()  #: replicated: (rank, relative difference
    #: from rank 0) of each replica that differs
    compared_rank: int = 0  #: replicated: the replica compared

    def as_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"step": self.step, "name": self.name, "call": self.call,
                               "rule": self.rule, "how": self.how, "why": self.why}
        if self.rule == "col":
            out.update(dim=self.dim, bounds=list(self.bounds))
        if self.rule == "replicated":
            out.update(compared_rank=self.compared_rank,
                       differs=[{"rank": r, "relative_difference": _num(e)}
                                for r, e in self.differs])
        return out


def _num(x: float) -> float | str:
    return x if math.isfinite(x) else str(x)


@dataclass(frozen=True)
class RankMerge:
    """Every merge of one side's ranks."""

    side: str  #: "reference" or "candidate"
    path: str
    world_size: int
    merges: tuple[Merge, ...]

    @property
    def undecided(self) -> tuple[Merge, ...]:
        return tuple(m for m in self.merges if m.rule is None)

    @property
    def replica_findings(self) -> tuple[Merge, ...]:
        return tuple(m for m in self.merges if m.differs)

    def find(self, step: int, name: str, call: int) -> Merge | None:
        return next((m for m in self.merges if (m.step, m.name, m.call) == (step, name, call)),
                    None)

    def counts(self) -> dict[str, int]:
        """Keys per ``rule (how)``, e.g. ``{"col (detected)": 12, "undecided": 1}``."""
        out: dict[str, int] = {}
        for m in self.merges:
            key = "undecided" if m.rule is None else f"{m.rule} ({m.how})"
            out[key] = out.get(key, 0) + 1
        return out

    def summary(self) -> str:
        """One line: the side, its ranks and how their records were merged."""
        parts = ", ".join(f"{n} {k}" for k, n in sorted(self.counts().items()))
        return f"the {self.side} has {self.world_size} ranks, merged per record: {parts}"

    def as_dict(self) -> dict[str, Any]:
        return {"side": self.side, "path": self.path, "world_size": self.world_size,
                "counts": self.counts(), "merges": [m.as_dict() for m in self.merges]}


def _merged_dump(path: Path, ranks: Sequence[Dump], records: list[Record],
                 parts: dict[int, Parts]) -> ComposedDump:
    """The ranks of a multi-rank recording seen as one dump: each record is a merged key."""
    first = ranks[0]
    meta = {k: v for k, v in first.meta.items() if k != "rank"}
    errors = [d.error for d in ranks if d.error]
    end = None if not all(d.complete for d in ranks) else \
        ({"type": "end", "error": errors[0]} if errors else {"type": "end"})
    return ComposedDump(path, first.header, records, meta, end, parts, ranks)


def _parts(merge: Merge, ranks: Sequence[Dump], recs: list[Record]) -> Parts:
    sources = tuple(zip(ranks, recs))
    if merge.rule == "col":
        return Parts("cat", sources, dim=merge.dim)
    if merge.rule == "row":
        return Parts("sum", sources)
    return Parts("one", sources, pick=merge.compared_rank)


def open_side(source: Dump | str | os.PathLike[str]) -> Dump | list[Dump]:
    """An opened dump, or every rank's dump of a multi-rank recording."""
    if isinstance(source, Dump):
        return source
    return open_ranks(source) if is_ranked(source) else open_dump(source)


def _col_dim(shapes: list[tuple[int, ...]], target: tuple[int, ...] | None) -> int | None:
    """The one dimension along which the ranks' shapes concatenate to ``target``."""
    if target is None or any(len(s) != len(target) for s in shapes):
        return None
    fits = [d for d in range(len(target))
            if all(s[:d] + s[d + 1:] == target[:d] + target[d + 1:] for s in shapes)
            and sum(s[d] for s in shapes) == target[d]]
    return fits[0] if len(fits) == 1 else None


def _same_bits(a: np.ndarray, b: np.ndarray) -> bool:
    """Bitwise equal (a NaN equals the same NaN; -0.0 differs from 0.0)."""
    return a.shape == b.shape and a.dtype == b.dtype and \
        np.array_equal(a.reshape(-1).view(np.uint8), b.reshape(-1).view(np.uint8))


def _all_same(ranks: Sequence[Dump], recs: list[Record]) -> bool:
    """Every rank's record holds rank 0's bits."""
    return all(_same_bits(ranks[0].raw(recs[0]), ranks[k].raw(recs[k]))
               for k in range(1, len(recs)))


def _replica_gaps(ranks: Sequence[Dump], recs: list[Record]) -> tuple[tuple[int, float], ...]:
    """(rank, relative difference from rank 0) of each replica not bitwise equal to rank 0's."""
    base = ranks[0].raw(recs[0])
    out = []
    for k in range(1, len(recs)):
        if not _same_bits(base, ranks[k].raw(recs[k])):
            out.append((k, relative_error(ranks[0].read(recs[0]), ranks[k].read(recs[k]))))
    return tuple(out)


def _annotated(recs: list[Record]) -> tuple[str, int] | str | None:
    """The ``shard`` field every rank gives (rule, dim); a text when it is unusable."""
    fields = [r.extra.get("shard") for r in recs]
    if all(f is None for f in fields):
        return None
    first = fields[0]
    if any(f != first for f in fields) or not isinstance(first, list) or len(first) != 2 or \
            first[0] not in RULES or type(first[1]) is not int:
        return f"its shard field is not the same [rule, dim] on every rank: {safe(fields, 120)}"
    return first[0], first[1]


def _decide(ranks: Sequence[Dump], recs: list[Record], other: Dump | None,
            counterpart: Record | None, ruled: tuple[str, int] | None = None) -> Merge:
    r0 = recs[0]
    base = Merge(r0.step, r0.name, r0.call, None, "detected")
    shapes = [r.shape for r in recs]
    if not all(r.has_data for r in recs):
        return replace(base, why="recorded as statistics only: ranks cannot be merged")
    if len({r.dtype for r in recs}) > 1:
        return replace(base, why="the ranks recorded it in different dtypes")
    note = _annotated(recs)
    if isinstance(note, str):
        return replace(base, how="annotated", why=note)
    how = "annotated" if note is not None else "mapping"
    note = note or ruled
    if note is not None:
        rule, dim = note
        base = replace(base, how=how, why=f"the record's shard field says {rule} on dim {dim}"
                       if how == "annotated" else f"the mapping file's [shard] says {rule}")
        if rule == "col" and len(recs) > 1 and counterpart is not None and \
                counterpart.shape == shapes[0] and all(s == shapes[0] for s in shapes) and \
                _all_same(ranks, recs):
            # each rank holds the whole tensor (gathered before it was recorded): one copy
            return _replicated(replace(base, why=f"{base.why}, but every rank holds the same "
                                       "values, each of the other side's whole shape: "
                                       "gathered already, one copy"),
                               ranks, recs, other, counterpart)
        if rule == "col":
            nd = len(shapes[0])
            d = dim + nd if dim < 0 else dim
            if not 0 <= d < nd or any(len(s) != nd or s[:d] + s[d + 1:] != shapes[0][:d] +
                                      shapes[0][d + 1:] for s in shapes):
                return replace(base, rule=None, why=f"{base.why}, but the ranks' shapes "
                               f"{shapes} do not concatenate on it")
            return replace(base, rule="col", dim=d, bounds=bounds(shapes, d))
        if any(s != shapes[0] for s in shapes):
            return replace(base, why=f"{base.why}, but the ranks' shapes differ: {shapes}")
        if rule == "row":
            if len(recs) > 1 and _all_same(ranks, recs):
                # partial sums of different shards are never the same bits: this is the
                # all-reduced output (annotated as the layer's), and summing it would be
                # world_size times the value
                return _replicated(replace(base, why=f"{base.why}, but every rank holds the "
                                           "same values: the sum already taken, one copy"),
                                   ranks, recs, other, counterpart)
            return replace(base, rule="row")
        return _replicated(base, ranks, recs, other, counterpart)
    # detected
    target = counterpart.shape if counterpart is not None else None
    cat = _col_dim(shapes, target)
    if cat is not None and any(s != target for s in shapes):
        return replace(base, rule="col", dim=cat, bounds=bounds(shapes, cat),
                       why=f"the shards concatenate on dim {cat} to the other side's shape")
    if any(s != shapes[0] for s in shapes):
        return replace(base, why=f"the ranks' shapes {shapes} differ and do not concatenate "
                       "to the other side's record" if target else
                       f"the ranks' shapes {shapes} differ and the other side has no record "
                       "of this name to fit")
    if _all_same(ranks, recs):
        return replace(base, rule="replicated", why="every rank holds the same values")
    if counterpart is None or other is None or not counterpart.has_data or target != shapes[0]:
        return replace(base, why="the ranks differ and the other side has no record of the "
                       "same shape to tell partial sums from replicas: annotate it "
                       "(probe(name, t, shard=...)) or give it the reference's name")
    ref = other.read(counterpart)
    total = np.zeros(ref.shape, dtype=np.float64)
    errs = []
    for dump, r in zip(ranks, recs):
        part = dump.read(r)
        total += part
        errs.append(relative_error(ref, part))
    err_sum = relative_error(ref, total)
    err_one = min((e for e in errs if not math.isnan(e)), default=math.nan)
    other.release(counterpart)
    if err_sum <= _FIT or err_sum <= err_one * _NEARER:  # (nan compares False)
        return replace(base, rule="row", why=f"the ranks' sum fits the other side (relative "
                       f"error {err_sum:.2g}; the nearest single rank {err_one:.2g})")
    if err_one <= _FIT or err_one <= err_sum * _NEARER:
        return _replicated(replace(base, why=f"one replica fits the other side (relative error "
                                   f"{err_one:.2g}; the ranks' sum {err_sum:.2g})"),
                           ranks, recs, other, counterpart, errs)
    return replace(base, why=f"neither the ranks' sum (relative error {err_sum:.2g}) nor one "
                   f"rank ({err_one:.2g}) fits the other side")


def _replicated(base: Merge, ranks: Sequence[Dump], recs: list[Record], other: Dump | None,
                counterpart: Record | None, errs: list[float] | None = None) -> Merge:
    """A replicated key: the replicas that differ, and the one to compare (the farthest from
    the other side's record, so that a bad replica cannot hide behind a good one)."""
    differs = _replica_gaps(ranks, recs)
    compared = 0
    if differs and other is not None and counterpart is not None and counterpart.has_data \
            and counterpart.shape == recs[0].shape:
        if errs is None:
            ref = other.read(counterpart)
            errs = [relative_error(ref, d.read(r)) for d, r in zip(ranks, recs)]
            other.release(counterpart)
        compared = max(range(len(errs)), key=lambda k: -1.0 if math.isnan(errs[k])
                       else errs[k])
    return replace(base, rule="replicated", differs=differs, compared_rank=compared)


def _counterpart(other: Dump | None, r: Record, mapping: MappingFile | None) -> Record | None:
    """The other side's record of the same name (or the one a mapping rule renames it to)."""
    if other is None:
        return None
    found = other.get(r.step, r.name, r.call)
    if found is None and mapping is not None:
        for hit in mapping.lookup(r.name):
            found = other.get(r.step, hit.ref_name, r.call)
            if found is not None:
                break
    return found


def merge_ranks(ranks: Sequence[Dump], side: str, other: Dump | None = None,
                mapping: MappingFile | None = None) -> tuple[ComposedDump, RankMerge]:
    """Merge ``ranks`` (rank order) into one dump, deciding each key's rule (module doc).

    ``mapping``: its ``[shard]`` rules apply to this side's names; its rename rules (on
    candidate names) find the other side's record when ``side`` is the candidate."""
    rename = mapping if side == "candidate" else None
    keyed: list[dict[tuple[int, str, int], Record]] = [{r.key: r for r in d} for d in ranks]
    records: list[Record] = []
    parts: dict[int, Parts] = {}
    merges: list[Merge] = []
    for r0 in ranks[0].records:
        recs = [k.get(r0.key) for k in keyed]
        missing = [i for i, r in enumerate(recs) if r is None]
        if missing:
            who = f"rank {missing[0]} has" if len(missing) == 1 else \
                f"ranks {', '.join(map(str, missing))} have"
            merges.append(Merge(r0.step, r0.name, r0.call, None, "detected",
                                why=f"{who} no record of it (its dump is missing or cut "
                                "short)"))
            continue
        present = [r for r in recs if r is not None]
        ruled = mapping.shard(r0.name) if mapping is not None else None
        merge = _decide(ranks, present, other, _counterpart(other, r0, rename), ruled)
        for d, r in zip(ranks, present):
            d.release(r)
        merges.append(merge)
        if merge.rule is None:
            continue
        shape = list(r0.shape)
        dtype = r0.dtype
        if merge.rule == "col":
            shape[merge.dim] = merge.bounds[-1]
        if merge.rule == "row":  # summed in float, as to_float reads the dtype
            dtype = "float64" if dtype in _WIDE else "float32"
        extra = {k: v for k, v in r0.extra.items() if k not in ("rank", "shard")}
        extra["unshard"] = merge.rule
        numel = math.prod(shape)
        how = _parts(merge, ranks, present)
        rec = Record(name=r0.name, step=r0.step, seq=r0.seq, dtype=dtype, shape=tuple(shape),
                     call=r0.call, offset=how.offset,
                     nbytes=numel * np.dtype(_storage(dtype)).itemsize, stats=None, extra=extra)
        records.append(rec)
        parts[rec.seq] = how
    # keys only a later rank recorded
    first = set(keyed[0])
    for k in range(1, len(ranks)):
        for r in ranks[k].records:
            if r.key not in first:
                first.add(r.key)
                merges.append(Merge(r.step, r.name, r.call, None, "detected",
                                    why=f"rank 0 has no record of it (only rank {k} does)"))
    path = Path(ranks[0].path).parent
    merged = _merged_dump(path, ranks, records, parts)
    return merged, RankMerge(side, str(path), len(ranks), tuple(merges))


def _storage(dtype: str) -> Any:
    found = lookup(dtype)
    assert found is not None
    return found.storage


def shard_blame(merge: Merge, ref: np.ndarray,
                cand: np.ndarray) -> tuple[tuple[int, float], ...] | None:
    """Per rank of a col-merged record, its shard's relative error against the reference's
    same slice; None when the arrays do not line up with the merge's bounds."""
    if merge.rule != "col" or ref.shape != cand.shape or merge.dim >= ref.ndim or \
            ref.shape[merge.dim] != merge.bounds[-1]:
        return None
    return slice_errors(ref, cand, merge.dim, merge.bounds)
