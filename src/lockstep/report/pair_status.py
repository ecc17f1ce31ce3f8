"""A compared pair's status word, as every face of the comparison report says it."""

from __future__ import annotations

import math

from ..compare.pair_result import DRIFT_FACTOR, PairResult
from ..compare.statistics import by_statistics

__all__ = ["status"]


def status(p: PairResult) -> str:
    """One pair's status: "match" (within tolerance), "drift" (within the bound drift may
    reach), "jump" (error introduced here), "inherited" (beyond that bound, carried in from
    earlier) or "incomparable"; a pair measured from statistics alone that would be "match" or
    "drift" is "statistics agree" (statistics cannot show that the data agrees)."""
    if math.isnan(p.error):
        return "incomparable"
    if p.jump:
        return "jump"
    if p.error > DRIFT_FACTOR * p.noise:
        return "inherited"
    if by_statistics(p.note):
        return "statistics agree"
    return "drift" if p.over or p.real_top1_disagreements else "match"
