"""A compared pair's status word, as every face of the comparison report says it."""

from __future__ import annotations

import math

from ..compare.pair_result import DRIFT_FACTOR, PairResult

__all__ = ["status"]


def status(p: PairResult) -> str:
    """One pair's status: "match" (within tolerance), "drift" (within the bound drift may
    reach), "jump" (error introduced here), "inherited" (beyond that bound, carried in from
    earlier) or "incomparable"."""
    if math.isnan(p.error):
        return "incomparable"
    if p.jump:
        return "jump"
    if p.error > DRIFT_FACTOR * p.noise:
        return "inherited"
    return "drift" if p.over or p.real_top1_disagreements else "match"
