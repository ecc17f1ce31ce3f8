"""Comparing sides whose steps were regrouped along their tokens (align.regroup): a prefill
fed in chunks, begun after a cached prefix, speculative decoding steps. Say how each side's
steps were cut and joined, what could not be (then the comparison is incomplete, never a
match), and which chunk a divergence lies in."""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any

from ..align.chunks import ChunkGroup, Chunking, chunk_errors
from ..align.drafts import DraftCut
from ..align.prefix import PrefixCut
from ..align.recompute import RecomputeCut
from ..align.regroup import Regrouping
from ..align.transforms import apply_transform, merged_meta
from ..display import safe
from ..errors import LockstepError
from ..store.reader import Dump
from .coverage import Gap

__all__ = ["ChunkReport", "with_chunks"]

_SHOWN = 10


@dataclass(frozen=True)
class ChunkReport:
    """How each side's chunked prefills were joined (and a step cut where the other side
    began after a cached prefix), and the chunk a divergence lies in."""

    sides: tuple[Chunking, ...]
    cuts: tuple[PrefixCut, ...] = ()
    drafts: tuple[DraftCut, ...] = ()
    recomputes: tuple[RecomputeCut, ...] = ()
    #: the first divergence is in a joined step: (chunk, relative error of its rows)
    chunk_errors: tuple[tuple[int, float], ...] = ()
    side: str | None = None  #: the side whose chunks chunk_errors are
    blamed: tuple[int, ...] = ()  #: the chunks (0-based) whose rows hold the error
    blame: str | None = None  #: the same, in words

    def lines(self) -> list[str]:
        """What the terminal report prints."""
        out = [line for c in self.cuts for line in c.lines()]
        out += [line for d in self.drafts[:_SHOWN] for line in d.lines()]
        if len(self.drafts) > _SHOWN:
            out.append(f"(and {len(self.drafts) - _SHOWN} more steps with rejected drafts)")
        out += [line for r in self.recomputes for line in r.lines()]
        out += [line for s in self.sides for line in s.lines()]
        return out + ([self.blame] if self.blame else [])

    def as_dict(self) -> dict[str, Any]:
        return {"sides": [s.as_dict() for s in self.sides],
                "prefix_cuts": [c.as_dict() for c in self.cuts],
                "draft_cuts": [d.as_dict() for d in self.drafts],
                "recompute_cuts": [r.as_dict() for r in self.recomputes],
                "lines": self.lines(),
                "side": self.side,
                "chunk_errors": [{"chunk": k, "error": e if math.isfinite(e) else str(e)}
                                 for k, e in self.chunk_errors],
                "blamed_chunks": list(self.blamed), "blame": self.blame}


def with_chunks(c: Any, regrouped: Regrouping, ref: Dump, cand: Dump) -> Any:
    """The comparison with its chunk report. ``ref`` and ``cand`` are the views compared
    (cut, joined, the candidate's steps numbered as the reference's); ``c`` is a
    compare.Comparison (not imported: comparison.py imports this module)."""
    if not regrouped:
        return c
    report = ChunkReport(regrouped.chunks, regrouped.cuts, regrouped.drafts,
                         regrouped.recomputes)
    left = [(s.side, step, name, why) for s in report.sides for step, name, why in s.left_out]
    left += [(x.side, x.step, name, why) for x in report.cuts for name, why in x.left_out]
    left += [(x.side, x.step, name, why) for x in report.drafts for name, why in x.left_out]
    left += [(x.side, x.step, name, why) for x in report.recomputes
             for name, why in x.left_out]
    if left and c.coverage is not None:
        side, step, name, why = left[0]
        reason = (f"{len(left)} record(s) of steps regrouped along their tokens (chunks, a "
                  f"cached prefix, speculative drafts, a sequence computed again) could not "
                  f"be joined or cut, so they "
                  f"were not compared; the first, the "
                  f"{side}'s {safe(name or '(root)')}@{step}: {why}")
        gap = Gap("chunks", reason, tuple(f"{safe(n or '(root)')}@{st}"
                                          for _, st, n, _ in left[:_SHOWN]))
        c = replace(c, coverage=replace(c.coverage, gaps=c.coverage.gaps + (gap,)))
        if c.verdict in ("match", "drift"):
            c = replace(c, verdict="incomplete")
    if c.first_divergence is not None:
        report = _blame(report, c, ref, cand)
    return replace(c, chunks=report)


def _group(report: ChunkReport, c: Any) -> tuple[str, ChunkGroup] | None:
    """The joined group the first divergence's step is, on either side."""
    step = c.first_divergence.step
    match = c.step_match
    cand_step = next((cs for rs, cs in match.pairs if rs == step), step) \
        if match is not None and match.method == "fed" else step
    for s in report.sides:
        g = s.group_of(cand_step if s.side == "candidate" else step)
        if g is not None:
            return s.side, g
    return None


def _blame(report: ChunkReport, c: Any, ref: Dump, cand: Dump) -> ChunkReport:
    """Measure the first divergence chunk by chunk: the rows each chunk was fed."""
    found = _group(report, c)
    p = c.first_divergence
    r_rec, c_rec = ref.by_seq(p.ref_seq), cand.by_seq(p.cand_seq)
    if found is None or r_rec is None or c_rec is None or not (r_rec.has_data and
                                                               c_rec.has_data):
        return report
    side, group = found
    try:
        a = apply_transform(p.ref_transform, ref.read(r_rec), ref.meta)
        b = apply_transform(p.cand_transform, cand.read(c_rec), merged_meta(ref, cand))
    except LockstepError:  # the layout does not fit: the pair was not measured
        return report
    finally:
        ref.release(r_rec)
        cand.release(c_rec)
    errors = chunk_errors(group, a, b)
    if errors is None:
        return report
    over = tuple(k for k, e in errors if not e <= p.tol)  # nan counts as over
    if not over:
        return replace(report, chunk_errors=errors, side=side)
    chunk = group.part
    where = "; ".join(f"{chunk(k)}: {e:.3g}" for k, e in errors)
    first = over[0]
    noun = "chunk" if group.prefill else "step"
    matched = f", after {first} {noun}{'s that match' if first > 1 else ' that matches'}" \
        if first else ""
    text = (f"the first divergence, {safe(p.ref_name or '(root)')}@{p.step}, starts in the "
            f"{side}'s {chunk(first)}{matched}; relative error per {noun}: {where}")
    return replace(report, chunk_errors=errors, side=side, blamed=over, blame=text)
