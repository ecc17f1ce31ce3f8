"""Comparing multi-rank recordings: merge each side's ranks before comparing
(align.unshard), then say how they were merged, what could not be, and which rank's shard
holds a divergence."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, replace
from typing import Any

from ..align.unshard import Merge, RankMerge, merge_ranks, open_side, shard_blame
from ..display import safe
from ..store.reader import Dump
from .coverage import Gap

__all__ = ["RankReport", "open_sides", "with_ranks"]

_SHOWN = 10


@dataclass(frozen=True)
class RankReport:
    """How each multi-rank side was merged, and the rank a divergence lies on."""

    sides: tuple[RankMerge, ...]
    #: the first divergence is a column-parallel record: (rank, relative error of its shard)
    shard_errors: tuple[tuple[int, float], ...] = ()
    blamed: tuple[int, ...] = ()  #: the ranks whose shard holds the error
    blame: str | None = None  #: the same, in words
    merged_as: str | None = None  #: how the first divergence's record was merged, in words

    def lines(self) -> list[str]:
        """What the terminal report prints."""
        out = [s.summary() for s in self.sides]
        for s in self.sides:
            for m in s.replica_findings[:_SHOWN]:
                gaps = ", ".join(f"rank {r} (relative difference {e:.2g})" for r, e in m.differs)
                out.append(f"replicated {safe(m.name or '(root)')}@{m.step} differs across "
                           f"the {s.side}'s ranks: {gaps} from rank 0")
        out += [line for line in (self.merged_as, self.blame) if line]
        return out

    def as_dict(self) -> dict[str, Any]:
        return {"sides": [s.as_dict() for s in self.sides], "lines": self.lines(),
                "shard_errors": [{"rank": r, "error": e if math.isfinite(e) else str(e)}
                                 for r, e in self.shard_errors],
                "blamed_ranks": list(self.blamed), "blame": self.blame,
                "merged_as": self.merged_as}


def open_sides(reference: Dump | str | os.PathLike[str],
               candidate: Dump | str | os.PathLike[str],
               mapping: Any = None) -> tuple[Dump, Dump, tuple[RankMerge, ...]]:
    """Both sides opened; a multi-rank side merged (the reference first, the candidate
    against it). The caller closes a side it did not pass in as a Dump."""
    ref_side = open_side(reference)
    try:
        cand_side = open_side(candidate)
    except BaseException:
        _close(ref_side, reference)
        raise
    merges: list[RankMerge] = []
    try:
        if isinstance(ref_side, list):
            other = cand_side if isinstance(cand_side, Dump) else None
            ref_side, merge = merge_ranks(ref_side, "reference", other, mapping)
            merges.append(merge)
        if isinstance(cand_side, list):
            cand_side, merge = merge_ranks(cand_side, "candidate", ref_side, mapping)
            merges.append(merge)
    except BaseException:
        _close(ref_side, reference)
        _close(cand_side, candidate)
        raise
    assert isinstance(ref_side, Dump) and isinstance(cand_side, Dump)
    return ref_side, cand_side, tuple(merges)


def _close(side: Dump | list[Dump], given: object) -> None:
    for d in side if isinstance(side, list) else [side]:
        if d is not given:
            d.close()


def with_ranks(c: Any, sides: tuple[RankMerge, ...], ref: Dump, cand: Dump) -> Any:
    """The comparison with its rank report: undecided keys make it incomplete (never a
    match), and a column-parallel divergence names the rank whose shard holds it. ``c`` is
    a compare.Comparison (not imported: comparison.py imports this module)."""
    if not sides:
        return c
    report = RankReport(sides)
    undecided = [(s, m) for s in sides for m in s.undecided]
    if undecided and c.coverage is not None:
        s, m = undecided[0]
        reason = (f"{len(undecided)} record(s) of the multi-rank {s.side} could not be merged "
                  f"across ranks, so they were not compared; the first, "
                  f"{safe(m.name or '(root)')}@{m.step}: {m.why}")
        gap = Gap("ranks", reason, tuple(f"{safe(x.name or '(root)')}@{x.step}"
                                        for _, x in undecided[:_SHOWN]))
        c = replace(c, coverage=replace(c.coverage, gaps=c.coverage.gaps + (gap,)))
        if c.verdict in ("match", "drift"):
            c = replace(c, verdict="incomplete")
    p = c.first_divergence
    if p is not None and not (p.ref_transform or p.cand_transform):
        report = _blame(report, p, ref, cand)
    return replace(c, ranks=report)


def _blame(report: RankReport, p: Any, ref: Dump, cand: Dump) -> RankReport:
    """Say how the first divergence's record was merged; when column-parallel, measure each
    rank's slice (records found by seq: the candidate's steps may have been renumbered)."""
    r_rec, c_rec = ref.by_seq(p.ref_seq), cand.by_seq(p.cand_seq)
    if r_rec is None or c_rec is None:
        return report
    for side in report.sides:
        rec = c_rec if side.side == "candidate" else r_rec
        merge = side.find(rec.step, rec.name, rec.call)
        if merge is None or merge.rule is None:
            continue
        why = f": {merge.why}" if merge.why else ""
        report = replace(report, merged_as=f"the first divergence, {safe(rec.name or '(root)')}"
                         f"@{rec.step}, is the {side.side}'s {side.world_size} ranks merged as "
                         f"{merge.rule} ({merge.how}{why})")
        if merge.rule != "col":
            continue
        errors = shard_blame(merge, ref.read(r_rec), cand.read(c_rec))
        ref.release(r_rec)
        cand.release(c_rec)
        if errors is not None:
            return replace(report, shard_errors=errors,
                           **_blamed(merge, errors, p.tol, side.side))
    return report


def _blamed(merge: Merge, errors: tuple[tuple[int, float], ...], tol: float,
            side: str) -> dict[str, Any]:
    over = tuple(r for r, e in errors if not e <= tol)  # nan counts as over
    if not over:
        worst = max(errors, key=lambda x: x[1] if math.isfinite(x[1]) else math.inf)
        over = (worst[0],)
    where = "; ".join(f"rank {r}: {e:.3g}" for r, e in errors)
    ranks = ", ".join(map(str, over))
    spans = ", ".join(f"{merge.bounds[r]}-{merge.bounds[r + 1] - 1}" for r in over)
    text = (f"the error lies in the shard of {side} rank{'s' if len(over) > 1 else ''} "
            f"{ranks} (indices {spans} of dim {merge.dim} of "
            f"{safe(merge.name or '(root)')}, column-parallel); relative error per shard: "
            f"{where}")
    return {"blamed": over, "blame": text}
