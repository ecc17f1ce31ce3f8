"""Diagnoses by where the divergence sits in the model and the run: the embedding, a decode
step (the token fed, its position, the KV cache), the logits, and an op (the fallback). Each
takes the ``Case`` and returns a ``Diagnosis`` or None (``op`` always gives one)."""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import numpy as np

from . import evidence as ev
from .case import ATTN_OUT, NORMS, ROPE_TABLES, Case, fmt, input_sentence, label
from .diagnosis import Diagnosis, make
from .rope import before_after, pairing_of, pre_rope, rope_views
from .verdict import DRIFT_FACTOR, PairResult

__all__ = ["embedding", "decode", "logits", "op"]

_MAX_STEPS = 64  # steps read back when looking a row up (rope tables, embeddings)
_OP_CHECKS: dict[str, str] = {
    "attn_heads": "the attention kernel: causal mask, softmax scale 1/sqrt(head_dim), the "
                  "query-head to KV-head mapping (GQA), attention rows summing to 1",
    "act": "the activation: SiLU vs GELU, gate and up swapped",
    "norm": "the norm: eps, the weight (and a 1+w offset), computed in float32, over the "
            "whole hidden size",
}


def embedding(case: Case) -> Diagnosis | None:
    """Token ids or embeddings differ at prefill: positions fed as ids, shifted or offset
    ids, or embeddings that differ while the ids agree."""
    f = case.first
    role = case.role(f)
    if role.op not in ("input_ids", "embed") or (f.step > 0 and case.prefill_ok):
        return None
    ids = f if role.op == "input_ids" else case.find(("input_ids",), None)
    evidence: list[str] = []
    detail: dict[str, Any] = {}
    id_arrays = case.arrays(ids) if ids is not None and not case.agrees(ids) else None
    if ids is not None and not case.agrees(ids) and id_arrays is None:
        return make("embedding", f"token ids differ at step {f.step} ({label(ids)}: "
                    f"{fmt(ids.error)} of them)", ["the prompt, tokenizer and chat template "
                                                   "on both sides"], evidence)
    if id_arrays is not None:
        ri, ci = id_arrays
        d = ev.describe_ids(ri, ci)
        detail.update(dataclasses.asdict(d),
                      reference_ids=ri.reshape(-1)[:16].astype(int).tolist(),
                      candidate_ids=ci.reshape(-1)[:16].astype(int).tolist())
        evidence.append(f"{d.differ} of {d.numel} token ids differ: reference "
                        f"{detail['reference_ids']}, candidate {detail['candidate_ids']}")
        if d.arange:
            title = (f"the candidate was fed positions as token ids (0..{d.numel - 1}) "
                     f"at step {f.step}")
            checks = ["the argument order of the model's forward: positions and input_ids "
                      "swapped (forward(positions, input_ids))",
                      "the batch built for prefill: input_ids are the prompt's tokens, "
                      "positions 0..T-1"]
        elif d.shift:
            title = (f"the candidate's token ids are shifted by {d.shift:+d} position "
                     "(a BOS token missing or added)")
            checks = ["BOS/special tokens: add_special_tokens, the chat template"]
        elif d.offset is not None:
            title = f"the candidate's token ids are the reference's {d.offset:+d}"
            checks = ["the tokenizer and vocabulary: the same tokenizer.json, added tokens"]
        else:
            title = f"token ids differ at step {f.step}: {d.differ} of {d.numel}"
            checks = ["the prompt and tokenizer: the same text, tokenizer.json and chat "
                      "template on both sides"]
        checks.append("the token ids' dtype (int32 vs int64) and that they reach the model")
        return make("embedding", title, checks, evidence, **detail)
    arrays = case.arrays(f)
    if ids is not None:
        evidence.append(f"the token ids agree ({label(ids)}); the embeddings do not "
                        f"(relative L2 {fmt(f.error)})")
    if arrays is not None and ev.squeeze(arrays[0]).ndim == 2:
        errs = ev.index_errors(*arrays, axis=0)
        bad = np.flatnonzero(errs > case.good())
        evidence.append(f"{bad.size} of {errs.size} positions' embeddings differ (first: "
                        f"{', '.join(map(str, bad[:8].tolist()))})")
        detail["positions_differing"] = bad[:16].tolist()
    if arrays is not None:
        s, res = ev.fit_scale(*arrays)
        if case.explains(res):
            evidence.append(f"the candidate's embeddings are {fmt(s)} x the reference's")
            detail["scale"] = s
    checks = ["the embedding weights (embed_tokens / token_embd): loaded, the right tensor "
              "and dtype, dequantized correctly (`lockstep weights`)",
              "the lookup: row = token id in a [vocab, hidden] table (not transposed)",
              "an embedding scale (x sqrt(hidden_size) in some models)"]
    if ids is None:
        checks.insert(0, "the token ids fed (not captured here: record input_ids)")
    return make("embedding", f"the embeddings differ at step {f.step}"
                + (" while the token ids agree" if ids is not None else ""), checks, evidence,
                **detail)


def _rows_by_position(case: Case, p: PairResult) -> tuple[np.ndarray, list[int]] | None:
    """The reference's rows of this pair's tensor over the steps (one row per position), and
    where each step starts."""
    rows: list[np.ndarray] = []
    starts: list[int] = []
    width = None
    for step in range(0, min(max(case.ref.steps, default=0) + 1, _MAX_STEPS)):
        q = case.same_name(p, step)
        a = case.arrays(q) if q is not None else None
        if a is None:
            break
        r = ev.squeeze(a[0])
        width = width or r.shape[-1]
        starts.append(sum(len(x) for x in rows))
        rows.append(r.reshape(-1, width))
    return (np.concatenate(rows), starts) if rows else None


def _lookup_rows(case: Case, p: PairResult) -> tuple[int, int] | None:
    """(the reference's position at this step, the position whose row the candidate's equals)."""
    table = _rows_by_position(case, p)
    arrays = case.arrays(p)
    if table is None or arrays is None or p.step >= len(table[1]):
        return None
    rows, starts = table
    c = ev.squeeze(arrays[1]).reshape(-1, rows.shape[1])
    hit = ev.match_row(rows, c[-1], max(case.good(p), 1e-5))
    return (starts[p.step] + len(c) - 1, hit) if hit is not None else None


def _wrong_token(case: Case, ids: PairResult | None, evidence: list[str]) -> Diagnosis:
    """A decode step fed another token: which, and whether it repeats the previous one."""
    f = case.first
    detail: dict[str, Any] = {"cause": "token"}
    title = f"decode step {f.step} was fed a different token than the reference"
    id_arrays = case.arrays(ids) if ids is not None else None
    if ids is not None and id_arrays is not None:
        ri, ci = (a.reshape(-1).astype(int) for a in id_arrays)
        detail.update(reference_token=ri[-1:].tolist(), candidate_token=ci[-1:].tolist())
        title = (f"decode step {f.step} was fed token {ci[-1]} where the reference fed "
                 f"{ri[-1]}")
        prev = case.same_name(ids, f.step - 1)
        pa = case.arrays(prev) if prev is not None else None
        if pa is not None and int(pa[1].reshape(-1)[-1]) == ci[-1]:
            title += " (the previous step's token again)"
            detail["repeats_previous"] = True
            evidence.append(f"token {ci[-1]} is the one the candidate fed at step "
                            f"{f.step - 1}: the last token was not updated")
    else:
        emb = f if case.role(f).op == "embed" else case.find(("embed",), None)
        hit = _lookup_rows(case, emb) if emb is not None else None
        if hit is not None:
            pos, found = hit
            detail.update(reference_position=pos, candidate_equals_position=found)
            evidence.append(f"the candidate's embedding at step {f.step} is the reference's "
                            f"for the token at position {found}, not {pos}")
            if found == pos - 1:
                title += " (the previous token again)"
                detail["repeats_previous"] = True
    checks = ["the token fed at each decode step: the last generated token (seq.last_token), "
              "appended after sampling, as a Python int",
              "the argument order of forward (positions, input_ids)"]
    return make("decode", title, checks, evidence, **detail)


def _position(case: Case, evidence: list[str]) -> Diagnosis:
    """A decode step rotated for another position: by how many, when the dumps say."""
    f = case.first
    role = case.role(f)
    detail: dict[str, Any] = {"cause": "position"}
    title = f"decode step {f.step} rotates Q/K for another position than the reference"
    arrays = case.arrays(f)
    if role.op == "positions" and arrays is not None:
        rp, cp = (int(a.reshape(-1)[-1]) for a in arrays)
        detail.update(reference_position=rp, candidate_position=cp, offset=cp - rp)
        title = (f"decode step {f.step} used position {cp} where the reference used {rp} "
                 f"(off by {cp - rp:+d})")
    elif role.op in ROPE_TABLES:
        hit = _lookup_rows(case, f)
        if hit is not None:
            rp, cp = hit
            detail.update(reference_position=rp, candidate_position=cp, offset=cp - rp)
            title = (f"decode step {f.step} rotates Q/K for position {cp} where the reference "
                     f"uses {rp} (off by {cp - rp:+d})")
            evidence.append(f"the candidate's {label(f)} at step {f.step} equals the "
                            f"reference's row for position {cp}; the reference is at {rp}")
    else:
        pre = pre_rope(case)
        if pre is not None:
            evidence.append(before_after(pre, f))
            views = rope_views(case, pre)
            if views is not None:
                x, r, c, _ = views
                pairing = pairing_of(x, r)
                if pairing is not None:
                    shift = float(ev.rotation(r, c, pairing)[0][:, 0].mean())
                    if round(shift) and abs(shift - round(shift)) < 0.05:
                        detail.update(offset=round(shift))
                        title = (f"decode step {f.step} rotates Q/K by {round(shift):+d} "
                                 "position(s) from the reference")
                        evidence.append(f"the candidate's fastest RoPE pair (1 rad per "
                                        f"position) is rotated {shift:.3f} rad further")
    checks = ["the position of the new token at decode: the sequence's length - 1, not its "
              "length (or the prompt length without the generated tokens)",
              "the positions given to RoPE and to the KV-cache slot are the same",
              "positions advance once per step (not per layer, not reset)"]
    return make("decode", title, checks, evidence, **detail)


def decode(case: Case) -> Diagnosis | None:
    """Prefill agrees, a decode step does not: the token fed (its ids or embedding differ),
    its position (RoPE tables, or q/k after RoPE with q/k before it agreeing), or the KV
    cache (the attention output differs while q, k, v agree)."""
    f = case.first
    if f.step == 0 or not case.prefill_ok:
        return None
    role = case.role(f)
    step0 = [p for p in case.results if p.step == 0 and not math.isnan(p.error)]
    evidence = [f"prefill (step 0) agrees: largest error {fmt(max(p.error for p in step0))} "
                f"over {len(step0)} pairs; step {f.step} diverges at {label(f)}"]
    ids = case.find(("input_ids",), None)
    if role.op == "input_ids" or (ids is not None and not case.agrees(ids)) or (
            role.op == "embed" and ids is None):
        return _wrong_token(case, f if role.op == "input_ids" else ids, evidence)
    if role.op in ("positions", *ROPE_TABLES):
        return _position(case, evidence)
    if role.op in ("q_rope", "k_rope"):
        pre = pre_rope(case)
        if pre is None or case.agrees(pre):
            return _position(case, evidence)
    if role.op in ATTN_OUT:
        inputs = [p for p in (case.find((op,), role.layer) for op in
                              ("q", "k", "v", "q_norm", "k_norm", "q_rope", "k_rope"))
                  if p is not None]
        if inputs and all(case.agrees(p) for p in inputs):
            roped = any(case.role(p).op.endswith("_rope") for p in inputs) or \
                case.find(ROPE_TABLES, None) is not None
            evidence.append("at this step " + ", ".join(f"{label(p)} {fmt(p.error)}"
                                                        for p in inputs) + ": all agree")
            checks = ["the KV cache: the slot the new token's K/V are written to "
                      "(slot_mapping, block_tables), and the positions attention reads "
                      "(context length including the new token)",
                      "what prefill wrote to the cache, and that decode reads the same layout"]
            if not roped:
                checks.append("the positions RoPE uses inside the attention (q/k after RoPE "
                              "were not captured)")
            return make("decode", f"decode step {f.step}: the attention output of layer "
                        f"{role.layer} differs while q, k, v agree: the KV cache "
                        + ("(written slot or read range)" if roped else "or RoPE positions"),
                        checks, evidence, cause="kv_cache" if roped else "kv_cache_or_position",
                        layer=role.layer)
    sentence, inp = input_sentence(case, f)
    evidence.append(sentence)
    checks = ["the token fed at this step (the last generated token)",
              "the position of the new token and the KV-cache slot it is written to",
              f"a decode-only path of {label(f)} (a GEMV kernel used for one token)"]
    return make("decode", f"prefill agrees; decode step {f.step} diverges at {label(f)}",
                checks, evidence, cause="unknown",
                input=label(inp) if inp is not None else None)


def logits(case: Case) -> Diagnosis | None:
    """The logits differ while the final norm agrees: where the top tokens fall, a scale."""
    f = case.first
    if case.role(f).op != "logits":
        return None
    norm = case.find(("final_norm",), None)
    if norm is not None and not case.agrees(norm):
        return None
    arrays = case.arrays(f)
    evidence = [f"the final norm {label(norm)} agrees (relative L2 {fmt(norm.error)}); the "
                f"logits differ ({fmt(f.error)})" if norm is not None else
                "the final norm's output was not captured"]
    detail: dict[str, Any] = {"final_norm_error": norm.error if norm is not None else None}
    bunched = False
    if arrays is not None:
        tail_c, top_c = ev.argmax_tail(arrays[1])
        tail_r, _ = ev.argmax_tail(arrays[0])
        vocab = ev.squeeze(arrays[0]).shape[-1]
        bunched = tail_c >= 0.75 and tail_c >= tail_r + 0.25
        evidence.append(f"the candidate's top token is in the last quarter of the vocabulary "
                        f"(ids >= {int(0.75 * vocab)} of {vocab}) at {100 * tail_c:.3g}% of "
                        f"positions (ids {list(top_c[:8])}), the reference's at "
                        f"{100 * tail_r:.3g}%")
        detail.update(argmax_tail_candidate=tail_c, argmax_tail_reference=tail_r,
                      candidate_argmax=list(top_c[:16]))
        s, res = ev.fit_scale(*arrays)
        if case.explains(res):
            evidence.append(f"the candidate's logits are {fmt(s)} x the reference's")
            detail["scale"] = s
    checks = ["the lm_head GEMM: transpose flag and leading dimension for a row-major "
              "[vocab, hidden] weight (cuBLAS is column-major)",
              "which weight: lm_head vs the tied embed_tokens (tie_word_embeddings), loaded "
              "at all (`lockstep weights`)",
              "the buffer fed to lm_head is the final norm's output",
              "the vocabulary size and padding, logit scaling or soft-capping"]
    if "scale" in detail:
        checks.insert(0, "a logit scale: temperature, logit_scale, soft-capping")
    title = ("the candidate's top tokens bunch at the end of the vocabulary while the final "
             "norm agrees: the lm_head weight is read in the wrong layout" if bunched else
             "the logits differ while the final norm agrees: the lm_head weight or its "
             "layout")
    return make("logits", title, checks, evidence, **detail)


def op(case: Case) -> Diagnosis:
    """The fallback: the op's output differs while its input agrees; a scale, or the few
    output features that differ."""
    f = case.first
    role = case.role(f)
    sentence, inp = input_sentence(case, f)
    evidence = [sentence, f"its output {label(f)} at step {f.step}: relative L2 "
                f"{fmt(f.error)} (inherited {fmt(f.inherited)})"]
    detail: dict[str, Any] = {"input": label(inp) if inp is not None else None,
                              "input_error": inp.error if inp is not None else None,
                              "output_error": f.error, "op": role.op or None}
    checks = [f"the weights of {label(f)}: loaded, the right tensor, dtype and "
              "dequantization (`lockstep weights`)",
              f"the kernel of {label(f)}: run it alone on the reference's input"]
    title = f"{label(f)} differs while its input agrees: the op's weights or kernel"
    if inp is not None and not case.agrees(inp):
        title = f"the error grows at {label(f)} from an input that already differs"
    arrays = case.arrays(f)
    if arrays is not None:
        s, res = ev.fit_scale(*arrays)
        if case.explains(res) and abs(s - 1) > 1e-3:
            detail["scale"] = s
            evidence.append(f"the candidate is {fmt(s)} x the reference everywhere "
                            f"(residual {fmt(res)})")
            title = f"{label(f)} is {fmt(s)} x the reference's while its input agrees"
            checks.insert(0, "a scale factor: a norm or layer-scale weight, an adapter's "
                          "alpha/rank, a dequantization scale, a residual multiplier")
        count, where = ev.confined(*arrays, max(DRIFT_FACTOR * f.noise, 1e-6))
        shape = ev.squeeze(arrays[0]).shape
        for axis, idx in where:
            if axis == len(shape) - 1:
                detail["features"] = list(idx)
                evidence.append(f"only features {list(idx)} of {shape[axis]} differ "
                                f"({count} elements)")
                checks.insert(0, f"rows {list(idx)} of the weight of {label(f)} (a corrupted "
                              "or misloaded slice)")
    extra = _OP_CHECKS.get("norm" if role.op in NORMS else role.op)
    if extra:
        checks.insert(1, extra)
    return make("op", title, checks, evidence, **detail)
