"""Error metrics between a reference tensor and a candidate tensor. Pure: arrays in, a frozen
result out; no logging, no I/O."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

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


def _squeeze(a: np.ndarray) -> np.ndarray:
    return a.reshape(tuple(n for n in a.shape if n != 1))


def _topk(ref: np.ndarray, cand: np.ndarray, absdiff: np.ndarray) -> TopK:
    vocab = ref.shape[-1] if ref.ndim else 1
    r = ref.reshape(-1, vocab)
    c = cand.reshape(-1, vocab)
    rt = np.argmax(np.where(np.isnan(r), -np.inf, r), axis=1)
    ct = np.argmax(np.where(np.isnan(c), -np.inf, c), axis=1)
    agree = rt == ct
    rows = np.arange(r.shape[0])
    # The reference prefers its top token by this margin over the candidate's choice; when
    # the error on that row is as large, either token is within noise: a near-tie.
    margin = r[rows, rt] - r[rows, ct]
    row_err = absdiff.reshape(-1, vocab).max(axis=1) if absdiff.size else np.zeros(len(rows))
    near = ~agree & (margin <= 2.0 * row_err)
    real = np.flatnonzero(~agree & ~near)
    return TopK(rows=int(r.shape[0]), agree=int(agree.sum()), near_ties=int(near.sum()),
                first_disagreement=int(real[0]) if real.size else None)


def tensor_metrics(ref: np.ndarray, cand: np.ndarray, *, logits: bool = False) -> TensorMetrics:
    """Compare two float arrays of the same shape (size-1 dims ignored)."""
    r = _squeeze(np.asarray(ref))
    c = _squeeze(np.asarray(cand))
    if r.shape != c.shape and (r.size or c.size):  # two empty tensors agree
        raise ShapeMismatch(f"shapes differ: reference {tuple(ref.shape)} vs candidate "
                            f"{tuple(cand.shape)}")
    if r.size == 0:
        return TensorMetrics(0, 0.0, 0.0, 0.0, 1.0, 0, 0, 0, 0, (), 0.0, 0.0, 0)
    r64 = r.astype(np.float64, copy=False)
    c64 = c.astype(np.float64, copy=False)
    r_fin = np.isfinite(r64)
    c_fin = np.isfinite(c64)
    all_finite = bool(r_fin.all() and c_fin.all())
    if all_finite:
        diff = c64 - r64
        both = None
        ref_nan = ref_inf = cand_nan = cand_inf = 0
        same_nonfinite = True
    else:
        both = r_fin & c_fin
        diff = np.where(both, c64 - r64, 0.0)
        ref_nan, cand_nan = int(np.isnan(r64).sum()), int(np.isnan(c64).sum())
        ref_inf, cand_inf = int(np.isinf(r64).sum()), int(np.isinf(c64).sum())
        # the same NaN/Inf at the same place on both sides is agreement, not error
        same_nonfinite = bool(np.array_equal(r64[~both], c64[~both], equal_nan=True)
                              and np.array_equal(r_fin, c_fin))
    absdiff = np.abs(diff)
    n = r64.size
    if same_nonfinite:
        flat_worst = int(np.argmax(absdiff))
    else:
        flat_worst = int(np.flatnonzero((r_fin != c_fin) | (~r_fin & (r64 != c64)))[0])
    worst = tuple(int(i) for i in np.unravel_index(flat_worst, r64.shape))
    rf = r64 if both is None else np.where(both, r64, 0.0)
    cf = c64 if both is None else np.where(both, c64, 0.0)
    ref_norm = float(np.sqrt(np.dot(rf.reshape(-1), rf.reshape(-1))))
    cand_norm = float(np.sqrt(np.dot(cf.reshape(-1), cf.reshape(-1))))
    err_norm = float(np.sqrt(np.dot(diff.reshape(-1), diff.reshape(-1))))
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
    else:
        cosine = float(np.dot(rf.reshape(-1), cf.reshape(-1)) / (ref_norm * cand_norm))
    mismatched = int(np.count_nonzero(diff)) + (0 if both is None else int((~both).sum())
                                                if not same_nonfinite else 0)
    return TensorMetrics(
        numel=n, max_abs=float(absdiff.max()), mean_abs=float(absdiff.mean()), rel_l2=rel,
        cosine=cosine, ref_nan=ref_nan, ref_inf=ref_inf, cand_nan=cand_nan, cand_inf=cand_inf,
        worst_index=worst, worst_ref=float(r64[worst]), worst_cand=float(c64[worst]),
        mismatched=mismatched, topk=_topk(r64, c64, absdiff) if logits and r64.ndim else None,
    )
