"""Per-record statistics: what a stats-only dump keeps instead of the data.

Every writer (ours, or one in another language) stores the same fields; see docs/format.md.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

__all__ = ["STAT_FIELDS", "array_stats", "clean_float"]

#: the fields of a record's "stats" object, in the order the report shows them
STAT_FIELDS = ("min", "max", "mean", "std", "abs_max", "nan", "inf", "zero")


def clean_float(x: float) -> float | None:
    """A float for JSON: None for NaN or infinity (JSON has neither)."""
    x = float(x)
    return x if math.isfinite(x) else None


def array_stats(values: np.ndarray) -> dict[str, Any]:
    """Statistics of a float array; min/max/mean/std/abs_max are over the finite elements."""
    flat = values.reshape(-1)
    n = flat.size
    if n == 0:
        return {"min": None, "max": None, "mean": None, "std": None, "abs_max": None,
                "nan": 0, "inf": 0, "zero": 0}
    with np.errstate(invalid="ignore", over="ignore"):  # +inf and -inf together sum to NaN
        finite_sum = float(np.sum(flat, dtype=np.float64))
    if math.isfinite(finite_sum):
        nan = inf = 0
        finite = flat
    else:
        nan_mask = np.isnan(flat)
        inf_mask = np.isinf(flat)
        nan, inf = int(nan_mask.sum()), int(inf_mask.sum())
        finite = flat[~(nan_mask | inf_mask)]
    zero = int(n - np.count_nonzero(flat))
    if finite.size == 0:
        return {"min": None, "max": None, "mean": None, "std": None, "abs_max": None,
                "nan": nan, "inf": inf, "zero": zero}
    lo, hi = float(finite.min()), float(finite.max())
    return {
        "min": clean_float(lo),
        "max": clean_float(hi),
        "mean": clean_float(np.mean(finite, dtype=np.float64)),
        "std": clean_float(np.std(finite, dtype=np.float64)),
        "abs_max": clean_float(max(abs(lo), abs(hi))),
        "nan": nan,
        "inf": inf,
        "zero": zero,
    }
