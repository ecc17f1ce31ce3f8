"""Summaries of timing samples: median, p10, p90, a bootstrap confidence interval of the
median, the candidate/reference ratio of medians with its interval, and whether the samples
are too noisy to trust (coefficient of variation over ``NOISY_CV``). numpy alone."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

__all__ = ["Summary", "Ratio", "summarize", "ratio", "NOISY_CV", "CONFIDENCE"]

#: samples whose standard deviation is above this share of their mean are called noisy
NOISY_CV = 0.10
#: the confidence of every interval
CONFIDENCE = 0.95
_RESAMPLES = 2000


@dataclass(frozen=True)
class Summary:
    """One figure over its samples (seconds, or whatever unit the samples are in)."""

    n: int
    median: float
    p10: float
    p90: float
    low: float  #: bootstrap confidence interval of the median
    high: float
    cv: float  #: coefficient of variation (std / mean)

    @property
    def noisy(self) -> bool:
        return self.cv > NOISY_CV

    def to_json(self) -> dict[str, Any]:
        return {"n": self.n, "median": self.median, "p10": self.p10, "p90": self.p90,
                "ci": [self.low, self.high], "cv": self.cv, "noisy": self.noisy}


@dataclass(frozen=True)
class Ratio:
    """candidate median / reference median, with a bootstrap confidence interval."""

    value: float
    low: float
    high: float

    def to_json(self) -> dict[str, Any]:
        return {"value": self.value, "ci": [self.low, self.high]}


def _rng(seed: int) -> np.random.Generator:
    return np.random.default_rng(seed)


def _boot_medians(x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    idx = rng.integers(0, len(x), size=(_RESAMPLES, len(x)))
    return np.median(x[idx], axis=1)


def _interval(values: np.ndarray) -> tuple[float, float]:
    tail = (1.0 - CONFIDENCE) / 2
    return float(np.quantile(values, tail)), float(np.quantile(values, 1.0 - tail))


def summarize(samples: Sequence[float], *, seed: int = 0) -> Summary:
    """Median, p10, p90, the median's bootstrap interval and the CV of ``samples``."""
    x = np.asarray(samples, dtype=np.float64)
    if x.size == 0:
        raise ValueError("no samples to summarize")
    mean = float(x.mean())
    cv = float(x.std(ddof=1) / mean) if x.size > 1 and mean > 0 else 0.0
    low, high = _interval(_boot_medians(x, _rng(seed))) if x.size > 1 else (x[0], x[0])
    return Summary(n=int(x.size), median=float(np.median(x)),
                   p10=float(np.quantile(x, 0.1)), p90=float(np.quantile(x, 0.9)),
                   low=float(low), high=float(high), cv=cv)


def ratio(candidate: Sequence[float], reference: Sequence[float], *, seed: int = 0) -> Ratio:
    """median(candidate) / median(reference), each side resampled on its own."""
    c = np.asarray(candidate, dtype=np.float64)
    r = np.asarray(reference, dtype=np.float64)
    if c.size == 0 or r.size == 0:
        raise ValueError("no samples to compare")
    value = float(np.median(c) / np.median(r))
    if c.size == 1 or r.size == 1:
        return Ratio(value, value, value)
    rng = _rng(seed)
    low, high = _interval(_boot_medians(c, rng) / _boot_medians(r, rng))
    return Ratio(value, low, high)
