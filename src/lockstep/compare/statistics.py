"""Comparing a pair from its statistics alone (a stats-only record on either side).

A record of a ``--stats-only`` capture keeps min, max, mean, std, abs_max and the NaN, Inf and
zero counts (store.stats), not the elements. Two such summaries can show that the tensors
differ; they can never show that they agree: agreeing statistics are "statistics agree",
never a match. ``LIMITS`` says what they can and cannot show, in every face of the report.
"""

from __future__ import annotations

import math
from typing import Any, Mapping

from ..store.reader import Dump, Record

__all__ = ["NOTE", "CAN_SHOW", "CANNOT_SHOW", "stats_error", "by_statistics"]

#: the note of a pair measured from statistics (PairResult.note); ``by_statistics`` tests it
NOTE = "statistics only (no data recorded)"

CAN_SHOW = (
    "NaN or Inf appearing, or their number changing",
    "a change of scale or offset (a missing or doubled norm, a wrong scale factor, a bias "
    "added twice): mean, std and the extremes move",
    "a tensor zeroed, saturated or holding a few huge outliers: the zero count, std, min, "
    "max or abs_max move",
)
CANNOT_SHOW = (
    "a permutation of the elements (rows, heads or positions swapped, a transposed or "
    "wrongly strided layout): every statistic is unchanged",
    "a sign flip of a symmetric distribution, or any change that keeps the moments: the "
    "statistics agree while the data does not",
    "an error smaller than about the tolerance times the std: mean and std move by at most "
    "the RMS of the difference, so a small error is below their resolution",
    "a few wrong elements among many, unless they set the min, max or a count",
)

_MOMENTS = ("mean", "std", "min", "max", "abs_max")


def _of(dump: Dump, record: Record) -> Mapping[str, Any]:
    """The record's statistics: stored, or computed from its data (its pages released)."""
    if not record.has_data:
        return record.stats or {}
    try:
        return dump.stats(record)
    finally:
        dump.release(record)


def stats_error(ref: Dump, cand: Dump, r: Record, c: Record) -> float:
    """An error from the two records' statistics, on the scale of a relative error.

    ``inf`` when the NaN or Inf counts differ; ``nan`` (incomparable) when a statistic is
    missing. Otherwise the largest of: the mean's and std's differences over the reference's
    scale (max of its std and |mean|), the extremes' (min, max, abs_max) over its abs_max, and
    the fraction of elements whose zero-ness changed. The
    moments' part is about a lower bound on the relative L2 error (|d mean| and |d std| are
    at most the RMS of the difference): statistics that differ show a difference; statistics
    that agree show nothing more than that.
    """
    rs, cs = _of(ref, r), _of(cand, c)
    counts = ("nan", "inf")
    if any(rs.get(k) is None or cs.get(k) is None for k in counts):
        return math.nan
    if any(int(rs[k]) != int(cs[k]) for k in counts):
        return math.inf
    finite_r = rs.get("mean") is not None
    if finite_r != (cs.get("mean") is not None):  # finite values on one side only
        return math.inf
    if not finite_r:  # no finite element on either side: the counts are all there is
        return 0.0
    if any(rs.get(k) is None or cs.get(k) is None for k in _MOMENTS):
        return math.nan
    scale = max(float(rs["std"]), abs(float(rs["mean"])), 1e-30)
    error = max(abs(float(cs[k]) - float(rs[k])) for k in ("mean", "std")) / scale
    extreme = max(float(rs["abs_max"]), scale)  # an extreme moves with its own size
    error = max(error, *(abs(float(cs[k]) - float(rs[k])) / extreme
                         for k in ("min", "max", "abs_max")))
    numel = math.prod(r.shape)
    if rs.get("zero") is not None and cs.get("zero") is not None and numel:
        error = max(error, abs(int(cs["zero"]) - int(rs["zero"])) / numel)
    return error


def by_statistics(note: str | None) -> bool:
    """The pair was measured from statistics, not data (its PairResult.note)."""
    return note == NOTE
