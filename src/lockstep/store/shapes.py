"""Which shapes a tensor can have: what a dump or a checkpoint may claim before we size it."""

from __future__ import annotations

import math
from typing import Any, Sequence

__all__ = ["MAX_DIMS", "MAX_ELEMENTS", "shape_problem"]

MAX_DIMS = 64  #: numpy's limit: a shape of more dimensions cannot be an array
MAX_ELEMENTS = 1 << 40  #: a shape claiming more elements than this is corrupt


def shape_problem(shape: Sequence[Any]) -> str | None:
    """Why ``shape`` (non-negative integers) cannot be a tensor, or None when it can.

    Every dimension counts, also in an empty tensor: numpy cannot size (0, 2**62) either."""
    if len(shape) > MAX_DIMS:
        return f"absurd shape: {len(shape)} dimensions (at most {MAX_DIMS})"
    if math.prod(n for n in shape if n) > MAX_ELEMENTS:
        text = repr(list(shape))
        return f"absurd shape {text if len(text) < 80 else text[:77] + '...'}"
    return None
