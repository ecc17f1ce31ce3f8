"""Helpers the benchmark scripts share."""

from __future__ import annotations

import math
import os
import time
from typing import Callable


def settle(run: Callable[[], float], limit_s: float = 30.0) -> float | None:
    """Call ``run`` (which returns its own seconds) until three runs in a row are within 1.5x
    of the fastest (a shared VM can run 10-40x slower for a while); the seconds it took, or
    None if it never settled within ``limit_s``."""
    t0 = time.perf_counter()
    best, calm = math.inf, 0
    while calm < 3:
        if time.perf_counter() - t0 > limit_s:
            return None
        dt = run()
        best = min(best, dt)
        calm = calm + 1 if dt <= 1.5 * best else 0
    return time.perf_counter() - t0


def dir_stats(path: str) -> tuple[int, int]:
    """(bytes, files) under ``path``."""
    size = files = 0
    for root, _, names in os.walk(path):
        for name in names:
            size += os.path.getsize(os.path.join(root, name))
            files += 1
    return size, files
