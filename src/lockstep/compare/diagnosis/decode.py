"""The ``decode`` rule: prefill agrees, a decode step does not: the token fed, its position,
or the KV cache."""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from ...align.kinds import Kind as K
from ...textfmt import fmt
from .. import evidence as ev
from ..case import Case, input_sentence, label
from ..ops import ATTN_OUT, ROPE_TABLES
from ..pair_result import PairResult
from .model import Diagnosis, make, rule
from .rope import before_after, pairing_of, pre_rope, rope_views

__all__ = ["decode"]

_MAX_STEPS = 64  # steps read back when looking a row up (rope tables, embeddings)


def _rows_by_position(case: Case, p: PairResult) -> tuple[np.ndarray, list[int]] | None:
    """The reference's rows of this pair's tensor over the steps (one row per position), and
    where each step starts."""
    rows: list[np.ndarray] = []
    starts: list[int] = []
    width = None
    for step in range(min(max(case.ref.steps, default=0) + 1, _MAX_STEPS)):
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
        emb = f if case.role(f).op == K.EMBED else case.find((K.EMBED,), None)
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
    if role.op == K.POSITIONS and arrays is not None:
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


@rule("decode")
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
    ids = case.find((K.INPUT_IDS,), None)
    if role.op == K.INPUT_IDS or (ids is not None and not case.agrees(ids)) or (
            role.op == K.EMBED and ids is None):
        return _wrong_token(case, f if role.op == K.INPUT_IDS else ids, evidence)
    if role.op in (K.POSITIONS, *ROPE_TABLES):
        return _position(case, evidence)
    if role.op in (K.Q_ROPE, K.K_ROPE):
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
