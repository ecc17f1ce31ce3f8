"""The steps of two dumps regrouped along their tokens before the steps are matched: a step
cut where the other side began its prefill after a cached prefix (align.prefix), the rows of
rejected speculative drafts cut off (align.drafts), then the steps one side fed in one step
and the other in several joined (align.chunks: a chunked prefill, speculative decoding)."""

from __future__ import annotations

from dataclasses import dataclass

from ..store.reader import Dump
from .chunks import Chunking, join_chunks
from .drafts import DraftCut, cut_drafts
from .prefix import PrefixCut, cut_prefixes
from .recompute import RecomputeCut, cut_recomputes
from .steps import StepMatch, match_steps, restep

__all__ = ["Regrouping", "regroup", "line_up"]


@dataclass(frozen=True)
class Regrouping:
    """What was cut and joined, on each side."""

    cuts: tuple[PrefixCut, ...] = ()
    drafts: tuple[DraftCut, ...] = ()
    chunks: tuple[Chunking, ...] = ()
    recomputes: tuple[RecomputeCut, ...] = ()

    def __bool__(self) -> bool:
        return bool(self.cuts or self.drafts or self.chunks or self.recomputes)


def regroup(ref: Dump, cand: Dump) -> tuple[Dump, Dump, Regrouping]:
    """Both sides as compared: cut, then joined. The views share the dumps' mappings: close
    the dumps, not them."""
    ref, cand, cuts = cut_prefixes(ref, cand)
    ref, ref_drafts = cut_drafts(ref, "reference")
    cand, cand_drafts = cut_drafts(cand, "candidate")
    ref, ref_again = cut_recomputes(ref, "reference")
    cand, cand_again = cut_recomputes(cand, "candidate")
    ref, cand, chunked = join_chunks(ref, cand)
    return ref, cand, Regrouping(cuts, ref_drafts + cand_drafts, chunked,
                                 ref_again + cand_again)


def line_up(ref: Dump, cand: Dump) -> tuple[Dump, Dump, Regrouping, StepMatch]:
    """Both sides as compared: regrouped, then the candidate's steps numbered as the reference
    steps they match (align.steps). What compare and ``lockstep align`` pair."""
    ref, cand, regrouped = regroup(ref, cand)
    step_match = match_steps(ref, cand)
    return ref, restep(cand, step_match), regrouped, step_match
