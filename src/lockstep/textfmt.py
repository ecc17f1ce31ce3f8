"""Numbers as lockstep writes them for people (terminal reports, diagnosis sentences).

``fmt`` fits any float in 9 characters ("n/a" for NaN); ``pct`` writes a share as a
percentage; ``size`` writes a byte count (decimal units, as disks are sold); ``short``
writes an optional number with a few significant digits ("-" when there is none), for table
cells.
"""

from __future__ import annotations

import math

__all__ = ["fmt", "pct", "short", "size"]


def fmt(x: float) -> str:
    """A number in at most 9 characters."""
    if math.isnan(x):
        return "n/a"
    if math.isinf(x):
        return "inf"
    if x == 0:
        return "0"
    if 1e-3 <= abs(x) < 1e4:
        return f"{x:.4g}"
    return f"{x:.2e}"


def pct(part: float, whole: float) -> str:
    """``part`` as a percentage of ``whole``."""
    return f"{100.0 * part / whole:.3g}%" if whole else "0%"


def short(x: float | None, digits: int = 3) -> str:
    """``x`` to ``digits`` significant digits; "-" for None."""
    return "-" if x is None else f"{x:.{digits}g}"


def size(n: float) -> str:
    """A byte count in decimal units: ``1.23 GB``, ``412 kB``, ``96 B``."""
    for unit, scale in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.3g} {unit}"
    return f"{n:.0f} B"
