"""Error metrics between a reference tensor and a candidate tensor. Pure: arrays in, a frozen
result out; no logging, no I/O."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import numpy as np

from ..align.transforms import squeeze as _squeeze

__all__ = ["TensorMetrics", "TopK", "tensor_metrics", "ShapeMismatch"]


class ShapeMismatch(ValueError):
    """The two tensors do not hold the same number of elements in the same shape."""


@dataclass(frozen=True)
class TopK:
    """Agreement of the top-1 entries along the last dim of logit-like tensors."""

    rows: int  #: positions compared (all dims but the last, flattened)
    agree: int  #: positions where both sides' argmax is the same
    near_ties: int  #: disagreements where the reference's own margin is within the error
    first_disagreement: int | None  #: row index of the first real (not near-tie) disagreement

    @property
    def rate(self) -> float:
        return self.agree / self.rows if self.rows else 1.0

    @property
    def real_disagreements(self) -> int:
        return self.rows - self.agree - self.near_ties


@dataclass(frozen=True)
class TensorMetrics:
    """How far the candidate is from the reference."""

    numel: int
    max_abs: float  #: largest |cand - ref| over elements finite on both sides
    mean_abs: float
    rel_l2: float  #: ||cand - ref|| / ||ref||; inf when NaN/Inf differ between the sides
    cosine: float  #: cosine similarity of the flattened tensors (1.0 when both are zero; NaN
    #: when NaN/Inf sit where the other side is finite or differs)
    ref_nan: int
    ref_inf: int
    cand_nan: int
    cand_inf: int
    worst_index: tuple[int, ...]  #: index (in the reference's squeezed shape) of the worst element
    worst_ref: float
    worst_cand: float
    mismatched: int  #: elements that differ at all (exact comparisons: ints, bools)
    topk: TopK | None = None  #: for logit-like tensors

    @property
    def nonfinite_mismatch(self) -> bool:
        return (self.ref_nan, self.ref_inf) != (self.cand_nan, self.cand_inf)


#: elements per chunk: the chunk and its few temporaries stay in a core's L2 cache, and no
#: temporary the size of the whole tensor (a 50 MB logits tensor) is ever made
CHUNK = 1 << 16
#: elements measured between two calls of tensor_metrics' ``trim`` (64 MB of float32)
TRIM_EVERY = 1 << 24
# a float32 sum of squares in this range neither overflowed nor lost its terms to underflow;
# outside it the chunk's sums are taken again in float64
_SAFE_SQ = (1e-30, 1e30)


class _Sums:
    """What the chunks add up to: everything tensor_metrics reports, kept in float64."""

    def __init__(self, vocab: int | None) -> None:
        self.ss_ref = self.ss_cand = self.ss_err = self.dot = self.abs_sum = 0.0
        self.worst = -1.0  # largest |diff| so far (-1: none yet) and its flat index
        self.worst_at = 0
        self.mismatched = self.not_both = 0
        self.ref_nan = self.ref_inf = self.cand_nan = self.cand_inf = 0
        self.same_nonfinite = True
        self.first_bad: int | None = None  # first element whose non-finite values differ
        self.vocab = vocab
        self.rows = self.agree = self.near = 0
        self.first_real: int | None = None

    def add(self, start: int, r: np.ndarray, c: np.ndarray) -> None:
        """Add one chunk (1-d, starting at flat index ``start``; whole rows for logits)."""
        with np.errstate(over="ignore", invalid="ignore"):  # checked below
            ss_r, ss_c = float(np.dot(r, r)), float(np.dot(c, c))
        lo, hi = _SAFE_SQ
        if r.dtype == np.float64 or not (lo < ss_r < hi and lo < ss_c < hi):
            # NaN, Inf, overflow or values so small their squares vanish in float32:
            # this chunk in float64, element by element as the definition says
            self._add_exact(start, r.astype(np.float64), c.astype(np.float64))
            return
        diff = np.subtract(c, r)
        ss_d = float(np.dot(diff, diff))
        nonzero = int(np.count_nonzero(diff))
        if nonzero and not ss_d > lo:  # differences too small for float32 squares
            ss_d = float(np.dot(diff.astype(np.float64), diff.astype(np.float64)))
        self.ss_ref += ss_r
        self.ss_cand += ss_c
        self.ss_err += ss_d
        self.dot += float(np.dot(r, c))
        self.mismatched += nonzero
        np.abs(diff, out=diff)
        self._absdiff(start, r, c, diff, finite=True)

    def _add_exact(self, start: int, r: np.ndarray, c: np.ndarray) -> None:
        r_fin, c_fin = np.isfinite(r), np.isfinite(c)
        if r_fin.all() and c_fin.all():
            diff = c - r
            rf, cf = r, c
        else:
            both = r_fin & c_fin
            with np.errstate(invalid="ignore"):  # inf - inf where one side is not finite
                diff = np.where(both, c - r, 0.0)
            rf, cf = np.where(both, r, 0.0), np.where(both, c, 0.0)
            self.ref_nan += int(np.isnan(r).sum())
            self.cand_nan += int(np.isnan(c).sum())
            self.ref_inf += int(np.isinf(r).sum())
            self.cand_inf += int(np.isinf(c).sum())
            self.not_both += int((~both).sum())
            # the same NaN/Inf at the same place on both sides is agreement, not error
            self.same_nonfinite &= bool(np.array_equal(r[~both], c[~both], equal_nan=True)
                                        and np.array_equal(r_fin, c_fin))
            if self.first_bad is None:
                bad = np.flatnonzero((r_fin != c_fin) | (~r_fin & (r != c)))
                if bad.size:
                    self.first_bad = start + int(bad[0])
        self.ss_ref += float(np.dot(rf, rf))
        self.ss_cand += float(np.dot(cf, cf))
        self.ss_err += float(np.dot(diff, diff))
        self.dot += float(np.dot(rf, cf))
        self.mismatched += int(np.count_nonzero(diff))
        self._absdiff(start, r, c, np.abs(diff), finite=False)

    def _absdiff(self, start: int, r: np.ndarray, c: np.ndarray, absdiff: np.ndarray, *,
                 finite: bool) -> None:
        i = int(np.argmax(absdiff))
        if absdiff[i] > self.worst:  # strictly: the first of equal maxima, as argmax
            self.worst, self.worst_at = float(absdiff[i]), start + i
        self.abs_sum += float(absdiff.sum())
        if self.vocab is not None:
            self._topk(r, c, absdiff, finite)

    def _topk(self, r: np.ndarray, c: np.ndarray, absdiff: np.ndarray, finite: bool) -> None:
        vocab = self.vocab
        assert vocab is not None
        rr, cc = r.reshape(-1, vocab), c.reshape(-1, vocab)
        if finite:  # (NaN is never the top)
            rt, ct = np.argmax(rr, axis=1), np.argmax(cc, axis=1)
        else:
            rt = np.argmax(np.where(np.isnan(rr), -np.inf, rr), axis=1)
            ct = np.argmax(np.where(np.isnan(cc), -np.inf, cc), axis=1)
        agree = rt == ct
        rows = np.arange(rr.shape[0])
        # The reference prefers its top token by this margin over the candidate's choice;
        # when the error on that row is as large, either token is within noise: a near-tie.
        margin = rr[rows, rt].astype(np.float64) - rr[rows, ct].astype(np.float64)
        row_err = absdiff.reshape(-1, vocab).max(axis=1).astype(np.float64)
        near = ~agree & (margin <= 2.0 * row_err)
        real = np.flatnonzero(~agree & ~near)
        if self.first_real is None and real.size:
            self.first_real = self.rows + int(real[0])
        self.rows += int(rr.shape[0])
        self.agree += int(agree.sum())
        self.near += int(near.sum())


def tensor_metrics(ref: np.ndarray, cand: np.ndarray, *, logits: bool = False,
                   chunk: int = CHUNK, trim: Callable[[], None] | None = None) -> TensorMetrics:
    """Compare two float arrays of the same shape (size-1 dims ignored).

    Streamed in chunks of ``chunk`` elements (whole rows for logits): float32 inputs are
    measured in float32 with every sum carried in float64, and a chunk holding NaN, Inf or
    values whose squares float32 cannot hold is measured in float64 instead. ``trim`` is
    called after every ``TRIM_EVERY`` elements: for arrays mapped from a dump, it lets the
    pages already measured go (``Dump.trim``), so one huge tensor (the logits of a long
    prompt) is not held in memory whole."""
    r = _squeeze(np.asarray(ref))
    c = _squeeze(np.asarray(cand))
    if r.shape != c.shape and (r.size or c.size):  # two empty tensors agree
        raise ShapeMismatch(f"shapes differ: reference {tuple(ref.shape)} vs candidate "
                            f"{tuple(cand.shape)}")
    if r.size == 0:
        return TensorMetrics(0, 0.0, 0.0, 0.0, 1.0, 0, 0, 0, 0, (), 0.0, 0.0, 0)
    work = np.float64 if np.float64 in (r.dtype, c.dtype) else np.float32
    rflat = r.reshape(-1)
    cflat = c.reshape(-1)
    vocab = r.shape[-1] if logits and r.ndim else None
    step = max(1, chunk // vocab) * vocab if vocab else chunk
    sums = _Sums(vocab)
    n = r.size
    since_trim = 0
    for start in range(0, n, step):
        sums.add(start, rflat[start:start + step].astype(work, copy=False),
                 cflat[start:start + step].astype(work, copy=False))
        since_trim += step
        if trim is not None and since_trim >= TRIM_EVERY:
            trim()
            since_trim = 0
    same_nonfinite = sums.same_nonfinite
    flat_worst = sums.worst_at if same_nonfinite else sums.first_bad
    assert flat_worst is not None
    worst = tuple(int(i) for i in np.unravel_index(flat_worst, r.shape))
    ref_norm, cand_norm = math.sqrt(sums.ss_ref), math.sqrt(sums.ss_cand)
    err_norm = math.sqrt(sums.ss_err)
    if not same_nonfinite:
        rel = math.inf
    elif err_norm == 0.0:
        rel = 0.0
    else:
        rel = err_norm / ref_norm if ref_norm > 0 else math.inf
    if not same_nonfinite:
        cosine = math.nan  # NaN/Inf on one side: no similarity (never 1.0)
    elif ref_norm == 0.0 and cand_norm == 0.0:
        cosine = 1.0
    elif ref_norm == 0.0 or cand_norm == 0.0:
        cosine = 0.0
    else:  # (float32 chunks can round a hair past 1)
        cosine = max(-1.0, min(1.0, sums.dot / (ref_norm * cand_norm)))
    mismatched = sums.mismatched + (0 if same_nonfinite else sums.not_both)
    topk = None
    if vocab is not None:
        topk = TopK(rows=sums.rows, agree=sums.agree, near_ties=sums.near,
                    first_disagreement=sums.first_real)
    return TensorMetrics(
        numel=n, max_abs=sums.worst, mean_abs=sums.abs_sum / n, rel_l2=rel, cosine=cosine,
        ref_nan=sums.ref_nan, ref_inf=sums.ref_inf, cand_nan=sums.cand_nan,
        cand_inf=sums.cand_inf, worst_index=worst, worst_ref=float(r[worst]),
        worst_cand=float(c[worst]), mismatched=mismatched, topk=topk,
    )
