"""Summaries of timing samples: median, p10, p90, a bootstrap confidence interval of the
median, the candidate/reference ratio of medians with its interval, and whether the samples
are too noisy to trust: a coefficient of variation over ``NOISY_CV``, or a drift (the
median of the run's second half off the first half's by more than ``DRIFT``: the machine
changed speed during the run, e.g. a VM whose two vCPUs stopped running in parallel, which a
low CV within each half would hide). numpy alone.

Samples taken in more than one process (``groups``: each sample's fork, as JMH forks) are
resampled in two stages: the forks with replacement, then each chosen fork's samples. A
fresh process of the same engine on an idle machine lands a few percent away from the last
(llama.cpp on SmolLM2, six processes in a row: medians 94.7 to 99.0 ms, each one's own
interval about 1% wide), so an interval from one process's samples alone is narrower than
what a rerun gives; the two-stage interval takes the forks' spread in."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

__all__ = ["Summary", "Ratio", "summarize", "ratio", "NOISY_CV", "DRIFT", "FORKS_APART",
           "CONFIDENCE", "NOISY_WHY", "fork_spread"]

#: samples whose standard deviation is above this share of their mean are called noisy
NOISY_CV = 0.10
#: so are samples whose second half's median is off the first half's by more than this
#: share of the median (measured from ``DRIFT_MIN_SAMPLES`` samples on)
DRIFT = 0.05
DRIFT_MIN_SAMPLES = 6
#: and so are samples whose forks' medians span more than this share of the median: fresh
#: processes land a few percent apart on an idle machine (4.5% over six llama.cpp processes);
#: 17-22% is a machine that changed speed between them, as this project's VM does
FORKS_APART = 0.10
#: the confidence of every interval
CONFIDENCE = 0.95
_RESAMPLES = 2000
#: what a report says when a figure is noisy
NOISY_WHY = (f"vary by more than {NOISY_CV:.0%} (coefficient of variation), or drifted: "
             f"their run's second half was more than {DRIFT:.0%} faster or slower than its "
             f"first, or their forks (fresh processes) were more than {FORKS_APART:.0%} "
             "apart. The machine is busy, throttling, or changed speed during the run: read "
             "the ratio's interval, and do not hold these medians against another run's")


def fork_spread(fork_medians: Sequence[float]) -> float:
    """(largest - smallest) / their median, of the forks' medians; 0 for fewer than two."""
    if len(fork_medians) < 2:
        return 0.0
    mid = float(np.median(fork_medians))
    return (max(fork_medians) - min(fork_medians)) / mid if mid > 0 else 0.0


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
    #: (median of the second half - median of the first) / median; 0 with few samples
    drift: float = 0.0
    samples: tuple[float, ...] = ()  #: in the order they were taken
    fork_medians: tuple[float, ...] = ()  #: each fork's median, where there were forks

    @property
    def drifted(self) -> bool:
        return abs(self.drift) > DRIFT

    @property
    def forks_apart(self) -> bool:
        return fork_spread(self.fork_medians) > FORKS_APART

    @property
    def noisy(self) -> bool:
        return self.cv > NOISY_CV or self.drifted or self.forks_apart

    @property
    def flags(self) -> str:
        """Why the figure is not to be trusted, as a report's cell says it (or "")."""
        flags = " noisy" if self.cv > NOISY_CV else ""
        if self.drifted:
            flags += f" drifted {self.drift:+.0%}"
        if self.forks_apart:
            flags += f" forks {fork_spread(self.fork_medians):.0%} apart"
        return flags

    def to_json(self) -> dict[str, Any]:
        return {"n": self.n, "median": self.median, "p10": self.p10, "p90": self.p90,
                "ci": [self.low, self.high], "cv": self.cv, "drift": self.drift,
                "noisy": self.noisy, "samples": list(self.samples),
                "fork_medians": list(self.fork_medians)}


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


def _boot_medians(x: np.ndarray, rng: np.random.Generator,
                  groups: np.ndarray | None = None) -> np.ndarray:
    """Bootstrap medians of ``x``: plain, or in two stages where ``groups`` (a fork per
    sample) has more than one fork: the forks drawn with replacement, then each drawn
    fork's samples."""
    forks = np.unique(groups) if groups is not None else np.zeros(1)
    if len(forks) < 2:
        idx = rng.integers(0, len(x), size=(_RESAMPLES, len(x)))
        return np.median(x[idx], axis=1)
    parts = [x[groups == f] for f in forks]
    width = max(len(p) for p in parts)
    drawn = np.full((len(parts), _RESAMPLES, width), np.nan)  # each fork resampled alone
    for i, part in enumerate(parts):
        drawn[i, :, :len(part)] = part[rng.integers(0, len(part), size=(_RESAMPLES,
                                                                         len(part)))]
    picks = rng.integers(0, len(parts), size=(_RESAMPLES, len(parts)))
    pooled = drawn[picks, np.arange(_RESAMPLES)[:, None], :].reshape(_RESAMPLES, -1)
    return np.nanmedian(pooled, axis=1)


def _interval(values: np.ndarray) -> tuple[float, float]:
    tail = (1.0 - CONFIDENCE) / 2
    return float(np.quantile(values, tail)), float(np.quantile(values, 1.0 - tail))


def _groups(groups: Sequence[int] | None, n: int) -> np.ndarray | None:
    if groups is None:
        return None
    g = np.asarray(groups)
    if g.shape != (n,):
        raise ValueError(f"{g.size} fork labels for {n} samples")
    return g


def summarize(samples: Sequence[float], *, groups: Sequence[int] | None = None,
              seed: int = 0) -> Summary:
    """Median, p10, p90, the median's bootstrap interval and the CV of ``samples``;
    ``groups``: the fork (process) of each sample, for the two-stage interval."""
    x = np.asarray(samples, dtype=np.float64)
    if x.size == 0:
        raise ValueError("no samples to summarize")
    g = _groups(groups, x.size)
    mean = float(x.mean())
    cv = float(x.std(ddof=1) / mean) if x.size > 1 and mean > 0 else 0.0
    low, high = _interval(_boot_medians(x, _rng(seed), g)) if x.size > 1 else (x[0], x[0])
    forks = np.unique(g) if g is not None else ()
    fork_medians = tuple(float(np.median(x[g == f])) for f in forks) if len(forks) > 1 else ()
    median = float(np.median(x))
    drift = 0.0
    if x.size >= DRIFT_MIN_SAMPLES and median > 0:
        half = x.size // 2
        drift = float((np.median(x[-half:]) - np.median(x[:half])) / median)
    return Summary(n=int(x.size), median=median,
                   p10=float(np.quantile(x, 0.1)), p90=float(np.quantile(x, 0.9)),
                   low=float(low), high=float(high), cv=cv, drift=drift,
                   samples=tuple(float(v) for v in x), fork_medians=fork_medians)


def ratio(candidate: Sequence[float], reference: Sequence[float], *,
          cand_groups: Sequence[int] | None = None, ref_groups: Sequence[int] | None = None,
          seed: int = 0) -> Ratio:
    """median(candidate) / median(reference), each side resampled on its own (in two
    stages where its samples come from several forks)."""
    c = np.asarray(candidate, dtype=np.float64)
    r = np.asarray(reference, dtype=np.float64)
    if c.size == 0 or r.size == 0:
        raise ValueError("no samples to compare")
    value = float(np.median(c) / np.median(r))
    if c.size == 1 or r.size == 1:
        return Ratio(value, value, value)
    rng = _rng(seed)
    low, high = _interval(_boot_medians(c, rng, _groups(cand_groups, c.size))
                          / _boot_medians(r, rng, _groups(ref_groups, r.size)))
    return Ratio(value, low, high)
