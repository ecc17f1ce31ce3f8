"""Attention re-enacted from the reference's own q, k and v, to say what the candidate's
attention does differently: its soft cap (``softcap``), its sliding window (``window``), the
scale of its scores (``scale``), which kv head each query head reads (``gqa``) or its causal
mask (``mask``).

The reference's metadata names the constants its config sets (``attn_scale``,
``attn_softcap``, ``sliding_window``, ``sliding_layers``; engines/hf_attention.py), and the
head counts. With them the reference's attention output is recomputed (it must be
reproduced), then each variant that changes one thing; a variant that reproduces the
candidate is the diagnosis."""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from ...align.kinds import Kind as K
from ...textfmt import fmt
from .. import evidence as ev
from ..case import Case, label
from ..reenact import attend, head_orders, query_rows
from .model import Diagnosis, make, rule

__all__ = ["attention"]


def _inputs(case: Case, layer: int, heads: int, kv_heads: int, d: int, ref_out: np.ndarray,
            attend_as: Any) -> tuple[tuple[np.ndarray, np.ndarray, np.ndarray], float] | None:
    """The reference's q of this step and k, v of every step up to it, (tokens, heads, d),
    in the order of dims that reproduces the reference's attention output best (on the
    queries ``_rows`` picks), with that error."""
    f = case.first
    q = case.find((K.Q_ROPE,), layer)
    qa = case.arrays(q) if q is not None else None
    if qa is None:
        return None
    ks: list[list[np.ndarray]] = []
    vs = []
    for step in range(f.step + 1):
        k, v = case.find((K.K_ROPE,), layer, step=step), case.find((K.V,), layer, step=step)
        ka, va = (case.arrays(k) if k else None), (case.arrays(v) if v else None)
        if ka is None or va is None:
            return None
        ks.append(head_orders(ka[0], kv_heads, d))
        vs.append(va[0].reshape(-1, kv_heads, d))
    vv = np.concatenate(vs)
    best: tuple[tuple[np.ndarray, np.ndarray, np.ndarray], float] | None = None
    for qq in head_orders(qa[0], heads, d):
        for order in range(max(len(k) for k in ks)):
            kk = np.concatenate([k[min(order, len(k) - 1)] for k in ks])
            if kk.shape[0] != vv.shape[0]:
                continue
            inputs = (qq, kk, vv)
            rows = query_rows(qq.shape[0], kk.shape[0], heads)
            err = ev.rel_error(ref_out[rows], attend_as(*inputs, rows=rows))
            if best is None or err < best[1]:
                best = inputs, err
    return best


@rule("softcap", "window", "scale", "gqa", "mask")
def attention(case: Case) -> Diagnosis | None:
    f = case.first
    role = case.role(f)
    meta = case.ref.meta
    if role.op != K.ATTN_HEADS or role.layer is None:
        return None
    heads, kv_heads, d = case.meta("n_heads"), case.meta("n_kv_heads"), case.meta("head_dim")
    arrays = case.arrays(f)
    if not heads or not kv_heads or not d or arrays is None:
        return None
    layer = role.layer
    scale = float(meta.get("attn_scale") or d ** -0.5)
    cap = meta.get("attn_softcap")
    window = meta.get("sliding_window")
    sliding = layer in (meta.get("sliding_layers") or ())
    ref_window = window if sliding else None
    ref_out, cand_out = (a.reshape(-1, heads * d) for a in arrays)
    found = _inputs(case, layer, heads, kv_heads, d, ref_out,
                    lambda q, k, v, rows: attend(q, k, v, scale, cap, ref_window, rows=rows))
    if found is None or not case.reproduces(found[1]):
        return None
    inputs, ref_fit = found
    keys = inputs[1].shape[0]
    rows = query_rows(inputs[0].shape[0], keys, heads)
    variants: list[tuple[str, str, dict[str, Any], list[str]]] = []
    if cap is not None:
        variants.append(("softcap", f"the attention scores are capped at {cap:g} on one side "
                         f"only: the reference caps layer {layer}'s scores "
                         f"(cap·tanh(scores/cap)), the candidate does not",
                         dict(softcap=None),
                         ["the soft cap passed to the attention kernel (attn_logit_softcapping"
                          "): 0 or None disables it; a kernel without soft-cap support "
                          "silently drops it"]))
    for wrong, name in ((1.0 / d, f"1/{d} (1/head_dim)"), (1.0, "1 (no scale)")):
        if abs(scale - wrong) > 1e-9 * scale:
            variants.append(("scale", f"the attention scores are scaled by {name} where the "
                             f"reference scales them by {scale:.4g}", dict(scale=wrong),
                             [f"the scale of the scores: {scale:.4g} (1/sqrt(head_dim), or "
                              "query_pre_attn_scalar where the config sets it), applied once"]))
    if abs(scale - d ** -0.5) > 1e-9 * scale:
        variants.append(("scale", f"the attention scores differ by a constant factor "
                         f"{d ** -0.5 / scale:.4g}: the candidate scales them by 1/√{d} "
                         f"(head_dim), the reference by {scale:.4g} "
                         f"(1/√{1 / scale ** 2:g}, query_pre_attn_scalar)",
                         dict(scale=d ** -0.5),
                         ["the scale of the scores: query_pre_attn_scalar where the config "
                          "sets it, not head_dim"]))
    if window is not None and sliding:
        beyond = ["the window's size convention: the reference's query sees window keys, "
                  "itself included (key j > position - window)",
                  "whether the window reaches every sliding layer's attention call, in "
                  "prefill and in decode (a rotating KV cache that keeps window + 1 keys)"]
        variants.append(("window", f"keys beyond the window are attended: layer {layer}'s "
                         f"queries see {window + 1} keys where the reference's window is "
                         f"{window}", dict(window=window + 1), beyond))
        variants.append(("window", f"keys beyond the window are attended: layer {layer} "
                         f"attends to the whole history where the reference's window is "
                         f"{window} keys", dict(window=None), beyond))
    elif window is not None:
        variants.append(("window", f"a window of {window} masks keys on layer {layer}, a "
                         "global layer where the reference attends to every key",
                         dict(window=window),
                         ["which layers slide: the config's layer_types (Gemma 2: the even "
                          "layers), not every layer"]))
    if 1 < kv_heads < heads:
        variants.append(("gqa", f"query head h reads kv head h mod {kv_heads} (the kv heads "
                         f"tiled) where the reference's reads h // {heads // kv_heads} (each "
                         f"kv head shared by {heads // kv_heads} consecutive query heads)",
                         dict(tiled=True),
                         ["how the kv heads are expanded for grouped-query attention: "
                          "repeat_interleave along the head dim (transformers' repeat_kv), "
                          "not repeat/tile", "the kv head index in the kernel: "
                          f"h // {heads // kv_heads}, not h % {kv_heads}"]))
    if inputs[0].shape[0] > 1:
        variants.append(("mask", f"the causal mask is missing: layer {layer}'s queries attend "
                         "to later positions too", dict(causal=False),
                         ["the mask passed to the attention kernel at prefill (is_causal, or "
                          "an additive mask of -inf above the diagonal)",
                          "a softmax over every key of the step: keys after the query's "
                          "position must be excluded"]))
    if keys > inputs[0].shape[0]:
        variants.append(("mask", f"the causal mask is aligned top-left: layer {layer}'s query "
                         f"i sees keys 0..i, not the keys up to its own position (the "
                         f"{keys - inputs[0].shape[0]} cached before the step's "
                         f"{inputs[0].shape[0]} queries)", dict(top_left=True),
                         ["the mask of a step with fewer queries than keys (a decode step, "
                          "a later chunk, a verify step of drafts): torch's SDPA is_causal "
                          "aligns it top-left; pass an explicit mask or the query offset"]))
        variants.append(("mask", f"the key just written is not read: layer {layer}'s query at "
                         f"position p sees keys 0..p-1, not its own (the KV cache read one "
                         f"short at step {f.step})", dict(own_key=False),
                         ["the length of the cache the attention reads at decode: the tokens "
                          "so far including the one just written (seq_len + 1, not seq_len)",
                          "the order of the cache write and the attention read"]))
    for kind, title, change, checks in variants:
        args = {**dict(scale=scale, softcap=cap, window=ref_window), **change}
        err = ev.rel_error(cand_out[rows], attend(*inputs, **args, rows=rows))
        if not case.explains(err):
            continue
        some = "" if len(rows) == inputs[0].shape[0] else \
            f", {len(rows)} of its {inputs[0].shape[0]} queries"
        evidence = [f"attention recomputed from the reference's q, k and v of layer {layer} "
                    f"({keys} keys{some}) reproduces the reference's {label(f)}: relative L2 "
                    f"{fmt(ref_fit)}",
                    f"with {', '.join(f'{k} {v}' for k, v in change.items())} it reproduces "
                    f"the candidate's: relative L2 {fmt(err)} (unchanged: {fmt(f.error)})"]
        detail = {k: (None if isinstance(v, float) and math.isnan(v) else v)
                  for k, v in change.items()}
        return make(kind, title, checks, evidence, layer=layer, reference_scale=scale,
                    reference_softcap=cap, reference_window=ref_window, error_after=err,
                    candidate=detail)
    return None
