"""Attention re-enacted from q, k and v: the grouped-query, causal softmax attention an
engine's attention output must equal. The comparison's attention diagnoses
(compare.diagnosis.attention) recompute it from the reference's q, k and v with one thing
changed; the health check ``attention_output`` (health.reenact) from a dump's own.
"""

from __future__ import annotations

import numpy as np

from . import evidence as ev

__all__ = ["attend", "head_orders", "query_rows", "SCORES"]


def attend(q: np.ndarray, k: np.ndarray, v: np.ndarray, scale: float, softcap: float | None,
           window: int | None, *, tiled: bool = False, causal: bool = True,
           top_left: bool = False, own_key: bool = True,
           rows: np.ndarray | None = None) -> np.ndarray:
    """Causal grouped-query attention of the last T of S positions; q is (T, H, D), k and v
    (S, Hkv, D); a query sees keys j with pos - window < j <= pos. Query head h reads kv
    head h // (H / Hkv), or h % Hkv where ``tiled``; ``causal=False`` lets every query see
    every key; ``top_left`` puts query i at position i (the mask aligned to the first keys);
    ``own_key=False`` hides each query's own position's key (j < pos).
    Returns (T, H * D), or only the queries ``rows`` (indices into T)."""
    t, heads, d = q.shape
    s, kv_heads = k.shape[0], k.shape[1]
    q_count = t
    if rows is not None:
        q, t = q[rows], len(rows)
    group = heads // kv_heads
    if tiled:
        kk, vv = np.tile(k, (1, group, 1)), np.tile(v, (1, group, 1))
    else:
        kk, vv = np.repeat(k, group, axis=1), np.repeat(v, group, axis=1)  # (S, H, D)
    scores = np.einsum("thd,shd->hts", q, kk) * scale
    if softcap is not None:
        scores = np.tanh(scores / softcap) * softcap
    first = 0 if top_left else s - q_count
    pos = (first + (np.arange(t) if rows is None else rows))[:, None]
    keys = np.arange(s)[None]
    visible = (keys <= pos if own_key else keys < pos) if causal else \
        np.ones((t, s), dtype=bool)
    if window is not None:
        visible &= keys > pos - window
    scores = np.where(visible[None], scores, -np.inf)
    scores -= scores.max(-1, keepdims=True)
    probs = np.exp(scores)
    probs /= probs.sum(-1, keepdims=True)
    return np.einsum("hts,shd->thd", probs, vv).reshape(t, heads * d)


def head_orders(a: np.ndarray, heads: int, d: int) -> list[np.ndarray]:
    """``a`` as (tokens, heads, d): read as tokens first, and, where its dims allow, as
    heads first (transformers keeps q/k after RoPE as (batch, heads, tokens, d))."""
    x = ev.squeeze(a)
    out = [x.reshape(-1, heads, d)]
    if x.ndim == 3 and x.shape[0] == heads and x.shape[2] == d:
        out.insert(0 if x.shape[1] != heads else 1, np.swapaxes(x, 0, 1))
    return out


SCORES = 1 << 22  #: attention scores re-enacted at most (queries x keys x heads)


def query_rows(t: int, s: int, heads: int) -> np.ndarray:
    """The queries re-enacted: every one, or evenly spaced ones where all of them would
    make more than ``SCORES`` scores (a long prefill): the first and last among them."""
    return ev.spaced_rows(t, max(2, SCORES // max(s * heads, 1)))
