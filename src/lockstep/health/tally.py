"""How near records came to holding the same values: the one tally the checks for things
that do not change (RoPE, rows, steps, layers) keep."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import numpy as np

from .view import DumpView, Entry

__all__ = ["Tally", "relative", "SAME_TOLERANCE"]

#: largest difference, relative to the values' abs max, of two tensors called the same
SAME_TOLERANCE = 1e-6


def relative(a: np.ndarray, b: np.ndarray) -> float:
    """The largest difference of two tensors over their largest |value|."""
    scale = max(float(np.abs(a).max()), float(np.abs(b).max()), 1e-30)
    return float(np.abs(a - b).max()) / scale


@dataclass
class Tally:
    """Comparisons against ``tolerance``: how many were made, and the smallest difference of
    those found not the same (on a healthy dump, how far it stayed from the threshold)."""

    tolerance: float = SAME_TOLERANCE
    seen: int = 0
    closest: float = math.inf

    def add(self, difference: float) -> bool:
        """Count one comparison; whether it is within the tolerance (the same)."""
        self.seen += 1
        if difference <= self.tolerance:
            return True
        self.closest = min(self.closest, difference)
        return False

    def same(self, view: DumpView, a: Entry, b: Entry,
             distance: Callable[[np.ndarray, np.ndarray], float] = relative) -> bool | None:
        """Whether two records hold the same values (stats-only ones: every statistic
        equal); None where they cannot tell (no data, values not finite)."""
        by_stats = view.same_stats(a, b)
        if by_stats is not None:
            self.seen += 1
            return by_stats
        va, vb = view.values(a), view.values(b)
        if va is None or vb is None or va.size == 0 or not (
                np.isfinite(va).all() and np.isfinite(vb).all()):
            return None
        return self.add(distance(va, vb))

    @property
    def smallest(self) -> float | None:
        """The smallest difference seen that was not the same (None: none)."""
        return None if math.isinf(self.closest) else self.closest
