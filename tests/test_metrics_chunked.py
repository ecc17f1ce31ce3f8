"""Metrics measured in float32 chunks agree with the same metrics taken over the whole tensor
in float64, at every chunk boundary, with NaN, Inf, zeros, tiny and huge values."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from lockstep.compare.metrics import tensor_metrics


def whole_float64(ref: np.ndarray, cand: np.ndarray, logits: bool) -> dict:
    """The definitions, over the whole flattened tensor in float64 (the oracle)."""
    r, c = ref.astype(np.float64).reshape(-1), cand.astype(np.float64).reshape(-1)
    rf, cf = np.isfinite(r), np.isfinite(c)
    both = rf & cf
    with np.errstate(invalid="ignore"):
        diff = np.where(both, c - r, 0.0)
    ad = np.abs(diff)
    same = bool(np.array_equal(r[~both], c[~both], equal_nan=True) and np.array_equal(rf, cf))
    r0, c0 = np.where(both, r, 0.0), np.where(both, c, 0.0)
    nr, nc, ne = (math.sqrt(float(np.dot(x, x))) for x in (r0, c0, diff))
    rel = math.inf if not same else 0.0 if ne == 0 else ne / nr if nr > 0 else math.inf
    worst = int(np.argmax(ad)) if same else int(np.flatnonzero((rf != cf) | (~rf & (r != c)))[0])
    out = {"max_abs": float(ad.max()), "mean_abs": float(ad.mean()), "rel_l2": rel,
           "mismatched": int(np.count_nonzero(diff)) + (0 if same else int((~both).sum())),
           "nan": (int(np.isnan(r).sum()), int(np.isnan(c).sum())),
           "inf": (int(np.isinf(r).sum()), int(np.isinf(c).sum())), "worst": worst,
           # NaN/Inf on one side only: no similarity, never 1.0
           "cosine": math.nan if not same else 1.0 if nr == nc == 0 else 0.0 if 0 in (nr, nc)
           else float(np.dot(r0, c0)) / (nr * nc)}
    if logits:
        v = ref.shape[-1]
        rr, cc = r.reshape(-1, v), c.reshape(-1, v)
        rt = np.argmax(np.where(np.isnan(rr), -np.inf, rr), axis=1)
        ct = np.argmax(np.where(np.isnan(cc), -np.inf, cc), axis=1)
        rows = np.arange(len(rr))
        near = (rt != ct) & (rr[rows, rt] - rr[rows, ct] <= 2 * ad.reshape(-1, v).max(axis=1))
        real = np.flatnonzero((rt != ct) & ~near)
        out["topk"] = (int((rt == ct).sum()), int(near.sum()),
                       int(real[0]) if real.size else None)
    return out


def check(ref: np.ndarray, cand: np.ndarray, chunk: int, logits: bool = False) -> None:
    want = whole_float64(ref, cand, logits)
    m = tensor_metrics(ref, cand, logits=logits, chunk=chunk)
    assert m.mismatched == want["mismatched"]
    assert (m.ref_nan, m.cand_nan) == want["nan"] and (m.ref_inf, m.cand_inf) == want["inf"]
    flat = np.ravel_multi_index(m.worst_index, ref.shape) if m.worst_index else 0
    if want["max_abs"] > 0 or not math.isfinite(want["rel_l2"]):
        # float32 differences round: an equal maximum elsewhere may come first
        assert flat == want["worst"] or math.isclose(
            abs(float(cand.reshape(-1)[flat]) - float(ref.reshape(-1)[flat])),
            want["max_abs"], rel_tol=1e-6)
    for key in ("max_abs", "mean_abs", "rel_l2"):
        got = getattr(m, key)
        assert got == want[key] or math.isclose(got, want[key], rel_tol=1e-5, abs_tol=1e-30), key
    if math.isnan(want["cosine"]):
        assert math.isnan(m.cosine)
    else:
        assert math.isclose(m.cosine, want["cosine"], rel_tol=0, abs_tol=1e-6)
    if logits:
        assert (m.topk.agree, m.topk.near_ties, m.topk.first_disagreement) == want["topk"]


finite = st.floats(-1048576.0, 1048576.0, width=32)
odd = st.sampled_from([0.0, np.nan, np.inf, -np.inf, 1e-30, -3e-38, 1e25, 3e38, 1.0])


@settings(max_examples=150, deadline=None)
@given(ref=hnp.arrays(np.float32, st.integers(1, 300), elements=finite | odd),
       noise=hnp.arrays(np.float32, 300,
                        elements=st.floats(-0.0009765625, 0.0009765625, width=32) | odd),
       chunk=st.sampled_from([1, 7, 64, 1 << 16]))
def test_chunks_agree_with_the_whole_tensor_in_float64(ref, noise, chunk):
    with np.errstate(over="ignore", invalid="ignore"):
        cand = (ref + noise[:ref.size]).astype(np.float32)
    check(ref, cand, chunk)
    check(ref, ref.copy(), chunk)  # identical, NaNs included: no error at all


@pytest.mark.parametrize("chunk", [5, 40, 1 << 16])
def test_logits_rows_are_never_split_between_chunks(chunk):
    rng = np.random.default_rng(3)
    ref = rng.standard_normal((2, 9, 11)).astype(np.float32)
    cand = ref + rng.standard_normal(ref.shape).astype(np.float32) * 0.3
    cand[1, 4, 2] = np.nan
    check(ref, cand, chunk, logits=True)
    m = tensor_metrics(ref, cand, logits=True, chunk=chunk)
    assert m.topk.rows == 18 and m.topk.agree < 18  # the noise moved some top tokens


def test_large_tensors_are_measured_in_float32_chunks_without_whole_copies():
    rng = np.random.default_rng(0)
    ref = rng.standard_normal(1 << 20).astype(np.float32)
    cand = ref + np.float32(1e-4) * rng.standard_normal(ref.size).astype(np.float32)
    check(ref, cand, 1 << 16)
    m = tensor_metrics(ref, cand)
    assert 0.9e-4 < m.rel_l2 < 1.1e-4 and m.mismatched > 0.99 * ref.size
