"""Next-token metrics between a reference's and a candidate's logits, step by step.

Pure numpy: logits in, frozen results out. Every margin is in log-probability units (nats),
which within one row are the same as logit units: ``logprob[a] - logprob[b] == logit[a] -
logit[b]``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np

__all__ = ["MAX_KL", "NEAR_TIE", "KLStats", "StepCompare", "StepSummary", "compare_steps",
           "compare_step", "kl_divergence", "log_softmax", "summarize", "top2_margin",
           "top_k_ids", "top_k_overlap"]

#: default near-tie threshold (nats): a split where each side prefers its own token over the
#: other side's by at most this much is a near-tie, not a bug
NEAR_TIE = 1.0
#: default KL limit (nats): a prompt whose mean KL(reference || candidate) over its steps is
#: above this diverges in distribution, even where every top token agrees
MAX_KL = 0.05

SAME, NEAR_TIE_KIND, SPLIT = "same", "near_tie", "split"


def log_softmax(logits: np.ndarray) -> np.ndarray:
    """Log-probabilities along the last axis, in float64 (a row with NaN or +Inf gives NaN)."""
    x = np.asarray(logits, dtype=np.float64)
    top = np.max(x, axis=-1, keepdims=True)
    top = np.where(np.isneginf(top), 0.0, top)  # a row of only -inf stays -inf, not NaN
    with np.errstate(invalid="ignore", over="ignore", divide="ignore"):
        shifted = x - top
        return shifted - np.log(np.sum(np.exp(shifted), axis=-1, keepdims=True))


def kl_divergence(ref_logits: np.ndarray, cand_logits: np.ndarray) -> np.ndarray:
    """KL(reference || candidate) in nats, one value per row; ``inf`` where the candidate
    gives zero probability to a token the reference does not, NaN for non-finite logits."""
    return _kl(log_softmax(ref_logits), log_softmax(cand_logits))


def _kl(lp: np.ndarray, lq: np.ndarray) -> np.ndarray:
    """KL from log-probabilities."""
    p = np.exp(lp)
    with np.errstate(invalid="ignore"):
        terms = np.where(p > 0, p * (lp - lq), 0.0)
    terms = np.where(np.isnan(lp) | np.isnan(lq), np.nan, terms)
    return np.maximum(terms.sum(axis=-1), 0.0)  # rounding can make a zero KL slightly negative


def top_k_ids(logits: np.ndarray, k: int) -> np.ndarray:
    """The ``k`` highest-scoring token ids per row, best first (ties: the lower id first);
    NaN counts as the lowest score."""
    x = np.asarray(logits, dtype=np.float64)
    x = np.where(np.isnan(x), -np.inf, x)
    shape = x.shape
    x = x.reshape(-1, shape[-1])
    k = min(k, shape[-1])
    # partition first (a full sort of a 150k vocabulary per row is the slow part), then order
    # every id scoring at least the k-th best: best first, equal scores by id
    part = np.argpartition(-x, k - 1, axis=-1)[:, :k]
    kth = np.take_along_axis(x, part, axis=-1).min(axis=-1)
    out = np.empty((x.shape[0], k), dtype=np.int64)
    for i, row in enumerate(x):
        ids = np.flatnonzero(row >= kth[i])
        out[i] = ids[np.lexsort((ids, -row[ids]))[:k]]
    return out.reshape(shape[:-1] + (k,))


def top2_margin(logits: np.ndarray) -> np.ndarray:
    """Top-1 minus top-2 score per row (logit units; ``inf`` with a one-token vocabulary)."""
    x = np.asarray(logits, dtype=np.float64)
    if x.shape[-1] < 2:
        return np.full(x.shape[:-1], math.inf)
    two = -np.partition(-np.where(np.isnan(x), -np.inf, x), 1, axis=-1)[..., :2]
    with np.errstate(invalid="ignore"):
        return two[..., 0] - two[..., 1]


def top_k_overlap(ref_ids: np.ndarray, cand_ids: np.ndarray) -> np.ndarray:
    """The fraction of the reference's top-k ids that are also among the candidate's, per
    row (order ignored)."""
    ref_ids = np.atleast_2d(ref_ids)
    cand_ids = np.atleast_2d(cand_ids)
    k = ref_ids.shape[-1]
    hits = np.array([np.intersect1d(r, c).size for r, c in zip(ref_ids, cand_ids)])
    return hits / k if k else np.ones(len(ref_ids))


@dataclass(frozen=True)
class StepCompare:
    """One decode step: both sides' next-token distributions given the same input tokens."""

    step: int  #: 0 = the prefill's next token, then one per decode step
    ref_token: int  #: the reference's greedy token
    cand_token: int  #: the candidate's greedy token
    ref_margin: float  #: the reference's top-1 minus top-2 log-probability
    cand_margin: float  #: the candidate's top-1 minus top-2 log-probability
    ref_gap: float  #: how much the reference prefers its token over the candidate's (0 if equal)
    cand_gap: float  #: how much the candidate prefers its token over the reference's
    kl: float  #: KL(reference || candidate), nats
    overlap: float  #: fraction of the reference's top-k also in the candidate's top-k
    ref_in_cand_top_k: bool  #: the reference's token is among the candidate's top-k
    cand_in_ref_top_k: bool  #: the candidate's token is among the reference's top-k
    ref_prob: float  #: the reference's probability of its own token
    cand_prob: float  #: the candidate's probability of the reference's token
    kind: str  #: "same" (tokens agree), "near_tie" (both gaps within the threshold), "split"
    same_argmax: bool = True  #: both logits rank the same token first (whatever was chosen)
    ref_top: tuple[tuple[int, float], ...] = ()  #: the reference's top-k (token, probability)
    cand_top: tuple[tuple[int, float], ...] = ()  #: the candidate's top-k (token, probability)

    @property
    def close(self) -> bool:
        """vLLM's closeness: each side's token is among the other's top-k."""
        return self.ref_in_cand_top_k and self.cand_in_ref_top_k

    @property
    def split(self) -> bool:
        """A real split: the tokens differ and it is not a near-tie."""
        return self.kind == SPLIT

    @property
    def off_argmax(self) -> bool:
        """The candidate chose a token its own logits rank below the reference's token: the
        logits-to-token step is wrong (sampling, temperature, the token's type)."""
        return self.cand_gap < 0


def _widen(a: np.ndarray, width: int) -> np.ndarray:
    """Rows padded with -inf up to ``width`` columns (one engine may pad its vocabulary)."""
    if a.shape[-1] >= width:
        return a
    pad = np.full(a.shape[:-1] + (width - a.shape[-1],), -np.inf)
    return np.concatenate([a, pad], axis=-1)


def compare_steps(ref_logits: np.ndarray, cand_logits: np.ndarray, *,
                  ref_tokens: Sequence[int] | None = None,
                  cand_tokens: Sequence[int] | None = None, top_k: int = 5,
                  near_tie: float = NEAR_TIE, first_step: int = 0) -> tuple[StepCompare, ...]:
    """Compare two ``(steps, vocab)`` logit arrays row by row.

    ``ref_tokens``/``cand_tokens`` are the greedy tokens each engine chose (default: the
    argmax of its row). Rows of different widths are compared over the wider vocabulary, the
    narrower side's missing ids at probability zero.
    """
    r = np.atleast_2d(np.asarray(ref_logits, dtype=np.float64))
    c = np.atleast_2d(np.asarray(cand_logits, dtype=np.float64))
    if r.shape[0] != c.shape[0]:
        raise ValueError(f"{r.shape[0]} reference rows vs {c.shape[0]} candidate rows")
    width = max(r.shape[-1], c.shape[-1])
    r, c = _widen(r, width), _widen(c, width)
    n = r.shape[0]
    rt = np.asarray(ref_tokens if ref_tokens is not None else top_k_ids(r, 1)[:, 0])
    ct = np.asarray(cand_tokens if cand_tokens is not None else top_k_ids(c, 1)[:, 0])
    lp, lq = log_softmax(r), log_softmax(c)
    rows = np.arange(n)
    with np.errstate(invalid="ignore"):
        ref_gap = np.where(rt == ct, 0.0, lp[rows, rt] - lp[rows, ct])
        cand_gap = np.where(rt == ct, 0.0, lq[rows, ct] - lq[rows, rt])
    kl = _kl(lp, lq)
    rk, ck = top_k_ids(r, top_k), top_k_ids(c, top_k)
    same_argmax = top_k_ids(r, 1)[:, 0] == top_k_ids(c, 1)[:, 0]
    overlap = top_k_overlap(rk, ck)
    ref_margin, cand_margin = top2_margin(lp), top2_margin(lq)
    out = []
    for i in range(n):
        if rt[i] == ct[i]:
            kind = SAME
        elif 0 <= ref_gap[i] <= near_tie and 0 <= cand_gap[i] <= near_tie:
            kind = NEAR_TIE_KIND  # NaN, or a side that chose below its own top, never is
        else:
            kind = SPLIT
        out.append(StepCompare(
            step=first_step + i, ref_token=int(rt[i]), cand_token=int(ct[i]),
            ref_margin=float(ref_margin[i]), cand_margin=float(cand_margin[i]),
            ref_gap=float(ref_gap[i]), cand_gap=float(cand_gap[i]), kl=float(kl[i]),
            overlap=float(overlap[i]), ref_in_cand_top_k=bool(rt[i] in ck[i]),
            cand_in_ref_top_k=bool(ct[i] in rk[i]), ref_prob=float(np.exp(lp[i, rt[i]])),
            cand_prob=float(np.exp(lq[i, rt[i]])), kind=kind, same_argmax=bool(same_argmax[i]),
            ref_top=tuple((int(t), float(np.exp(lp[i, t]))) for t in rk[i]),
            cand_top=tuple((int(t), float(np.exp(lq[i, t]))) for t in ck[i])))
    return tuple(out)


def compare_step(ref_row: np.ndarray, cand_row: np.ndarray, ref_token: int, cand_token: int,
                 *, step: int, top_k: int = 5, near_tie: float = NEAR_TIE) -> StepCompare:
    """One step of :func:`compare_steps` (a free-running split)."""
    return compare_steps(np.asarray(ref_row)[None], np.asarray(cand_row)[None],
                         ref_tokens=[ref_token], cand_tokens=[cand_token], top_k=top_k,
                         near_tie=near_tie, first_step=step)[0]


@dataclass(frozen=True)
class KLStats:
    """KL(reference || candidate) over steps, as llama.cpp's KL-divergence statistics."""

    count: int  #: finite values summarized
    nonfinite: int  #: steps whose KL is NaN or infinite (non-finite logits)
    mean: float
    median: float
    p99: float  #: 99th percentile (linear interpolation)
    max: float

    @classmethod
    def of(cls, values: Sequence[float] | np.ndarray) -> KLStats:
        v = np.asarray(values, dtype=np.float64).reshape(-1)
        finite = v[np.isfinite(v)]
        bad = int(v.size - finite.size)
        if not finite.size:
            return cls(0, bad, math.nan, math.nan, math.nan, math.nan)
        return cls(int(finite.size), bad, float(finite.mean()), float(np.median(finite)),
                   float(np.percentile(finite, 99)), float(finite.max()))


@dataclass(frozen=True)
class StepSummary:
    """Teacher-forced agreement over the steps of one prompt (or several)."""

    steps: int
    same_top: int  #: steps where both greedy tokens (the tokens each side chose) agree
    near_ties: int  #: disagreements within the near-tie threshold
    splits: int  #: real disagreements
    first_split: int | None  #: step of the first real disagreement
    not_close: int  #: disagreements where a token is outside the other side's top-k
    off_argmax: int  #: steps where the candidate's token is not the top of its own logits
    same_argmax: int  #: steps where both logits rank the same token first
    overlap: float  #: mean top-k overlap
    kl: KLStats
    dp_mean: float  #: mean of p_cand(ref token) - p_ref(ref token)
    dp_rms: float  #: root mean square of that difference

    @property
    def same_top_rate(self) -> float:
        return self.same_top / self.steps if self.steps else 1.0


def summarize(steps: Sequence[StepCompare]) -> StepSummary:
    """The summary of a run of steps."""
    first = next((s.step for s in steps if s.split), None)
    dp = np.array([s.cand_prob - s.ref_prob for s in steps], dtype=np.float64)
    dp = dp[np.isfinite(dp)]
    return StepSummary(
        steps=len(steps), same_top=sum(s.kind == SAME for s in steps),
        near_ties=sum(s.kind == NEAR_TIE_KIND for s in steps),
        splits=sum(s.split for s in steps), first_split=first,
        not_close=sum(s.kind != SAME and not s.close for s in steps),
        off_argmax=sum(s.off_argmax for s in steps),
        same_argmax=sum(s.same_argmax for s in steps),
        overlap=float(np.mean([s.overlap for s in steps])) if steps else 1.0,
        kl=KLStats.of([s.kl for s in steps]),
        dp_mean=float(dp.mean()) if dp.size else math.nan,
        dp_rms=float(np.sqrt(np.mean(dp * dp))) if dp.size else math.nan)
