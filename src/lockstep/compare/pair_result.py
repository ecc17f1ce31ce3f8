"""The verdict: match, drift or diverged, and where the divergence first appears.

Each pair's error is set against what it inherited: the largest error of anything captured
before it in the same step, and of the same tensor in earlier steps. Precision and quantization
noise enter and grow smoothly; a bug introduces a jump: an error above tolerance and far above
everything it inherited. The first divergence is the earliest such jump, in step order and
capture order, not merely the first tensor over a tight tolerance.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

from .metrics import TensorMetrics

__all__ = ["PairResult", "JUMP_FACTOR", "DRIFT_FACTOR", "decide", "inherited_errors"]

#: an error this many times what a tensor inherited is introduced there, not inherited
JUMP_FACTOR = 10.0
#: drift stays bounded: no error above this many times its noise tolerance
DRIFT_FACTOR = 10.0


@dataclass(frozen=True)
class PairResult:
    """One compared pair."""

    step: int
    ref_name: str
    cand_name: str
    ref_seq: int
    cand_seq: int
    call: int
    how: str  #: which pairing pass matched them ("name", "table", "normalized", "order")
    ref_shape: tuple[int, ...]
    cand_shape: tuple[int, ...]
    ref_dtype: str
    cand_dtype: str
    tol: float  #: at or below this error the pair matches (see compare.tolerance)
    noise: float  #: at or below this error it is explained by precision or quantization
    error: float  #: relative L2 error (mismatch fraction for exact dtypes; inf for NaN/Inf)
    metrics: TensorMetrics | None  #: None when only statistics could be compared
    note: str | None = None  #: why the comparison is partial, if it is
    inherited: float = 0.0  #: largest error this pair inherited (see module docstring)
    canonical: str | None = None  #: canonical op name, when a name table paired them
    transform: str | None = None  #: layout transform applied before comparing, if any
    ref_transform: str | None = None  #: the transform applied to the reference's tensor
    cand_transform: str | None = None  #: and to the candidate's

    @property
    def over(self) -> bool:
        """The error is above tolerance."""
        return self.error > self.tol

    @property
    def growth(self) -> float:
        """How many times the inherited error this pair's error is (inf from zero)."""
        if self.error == 0.0:
            return 0.0
        if self.inherited == 0.0 or (math.isinf(self.error) and not math.isinf(self.inherited)):
            return math.inf
        return self.error / self.inherited

    @property
    def jump(self) -> bool:
        """Above the noise and far above what it inherited: error introduced here."""
        return self.error > self.noise and self.growth >= JUMP_FACTOR

    @property
    def real_top1_disagreements(self) -> int:
        topk = self.metrics.topk if self.metrics else None
        return topk.real_disagreements if topk else 0


def inherited_errors(steps: Sequence[int], names: Sequence[str],
                     errors: Sequence[float]) -> list[float]:
    """For each pair (in step and capture order), the largest error before it in its step
    and of the same name in earlier steps."""
    out: list[float] = []
    by_name: dict[str, float] = {}
    step_max = 0.0
    current = None
    for step, name, err in zip(steps, names, errors):
        if step != current:
            current, step_max = step, 0.0
        out.append(max(step_max, by_name.get(name, 0.0)))
        if not math.isnan(err):
            step_max = max(step_max, err)
            by_name[name] = max(by_name.get(name, 0.0), err)
    return out


def decide(results: Sequence[PairResult]) -> tuple[str, PairResult | None]:
    """(verdict, first divergence) for pairs already in step and capture order."""
    over = [r for r in results if r.over]
    disagree = [r for r in results if r.real_top1_disagreements]
    if not over and not disagree:
        return "match", None
    for r in results:
        if r.jump:
            return "diverged", r
    bounded = all(r.error <= DRIFT_FACTOR * r.noise for r in over)
    if bounded and not disagree:
        return "drift", None
    # Grown out of bounds with no single jump: point at the steepest growth among the pairs
    # that precision or quantization noise cannot explain (then those over tolerance).
    pool = [r for r in over if r.error > r.noise] or over or disagree
    return "diverged", max(pool, key=lambda r: (r.growth, -r.step, -r.ref_seq))
