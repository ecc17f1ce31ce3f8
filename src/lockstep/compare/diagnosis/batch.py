"""The batch rule: one sequence of a batched run parts from its prompt's solo reference, and
the batch explains it. Four kinds, each naming the sequence pair:

- ``batch_kv_shared``: two sequences wrote the same KV-cache slots;
- ``batch_leak``: a sequence took another's values: its attention read slots another wrote,
  its chosen token is the other sequence's, or its tensor is the other's solo value;
- ``batch_positions``: RoPE at a left-padded sequence fits positions moved by its padding;
- ``batch_mask``: the attention output of a padded sequence differs while its q, k and v
  agree: padding keys were let in; or, in a packed batch, the tokens packed before it
  were (the sequence packed first in that step agreeing is the evidence).

The evidence is the layout the split dump carries in its metadata (``batch_sequence``,
written by ``lockstep.batching.split``): each step's row, padding and KV slots, and every
sequence's written slots and solo reference.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import numpy as np

from ...align.cuts import token_dim_across
from ...align.kinds import Kind as K
from ...align.steps import fed_per_step
from ...store.reader import open_dump
from ...textfmt import fmt
from .. import evidence as ev
from ..case import Case, input_sentence, label
from ..pair_result import PairResult
from ..reenact import attend
from .model import Diagnosis, make, rule
from .rope import pairing_of, pre_rope, rope_views

__all__ = ["batch", "BATCH_KINDS"]

BATCH_KINDS = ("batch_kv_shared", "batch_leak", "batch_positions", "batch_mask")
_NULL_SLOT = 0

_KV_CHECKS = ("the page allocator: one free list for the whole cache, each page handed to "
              "one sequence until it is freed",
              "each sequence's block table row: built from its own pages, not a counter that "
              "starts again for every sequence",
              "prefix sharing: a shared page must be copied before a sequence writes to it")
_READ_CHECKS = ("the block table row each sequence's attention reads: indexed by the "
                "sequence, not by its row before the batch was rebuilt",
                "a request joining mid-decode: its block table row is written before the "
                "kernel reads it",
                "the slot mapping and the block table agree for every row")
_TOKEN_CHECKS = ("the logits row each sequence's token is taken from: its own last token "
                 "(cu_seqlens[i+1] - 1 packed, its last real column padded)",
                 "a reorder of the batch (sorted by length) undone before the tokens are "
                 "handed back")
_POS_CHECKS = ("positions of a left-padded row: the index of each real token (cumsum of the "
               "attention mask minus 1), not its column",
               "a decode token's position: its sequence's length minus 1, not the padded "
               "width")
_MASK_CHECKS = ("the attention mask: padding keys masked out, beside the causal mask",
                "a left-padded row's causal mask lets every query see the padding before it: "
                "the padding mask is what hides it",
                "the kernel's key lengths per row (seq_lens), not the padded width")


def _steps(info: dict[str, Any]) -> list[dict[str, Any]]:
    steps = info.get("steps")
    return steps if isinstance(steps, list) else []


def _written(info: dict[str, Any]) -> dict[int, set[int]]:
    """Every sequence's written KV slots (the null slot left out)."""
    out: dict[int, set[int]] = {}
    for key, slots in (info.get("written") or {}).items():
        if isinstance(slots, list):
            out[int(key)] = {int(s) for s in slots} - {_NULL_SLOT}
    return out


def _pair_text(i: int, j: int) -> str:
    return f"sequences {i} and {j}"


def _shared(case: Case, info: dict[str, Any], i: int) -> Diagnosis | None:
    written = _written(info)
    mine = written.get(i, set())
    for j, theirs in sorted(written.items()):
        both = sorted(mine & theirs) if j != i else []
        if both:
            evidence = [f"sequence {i} wrote {len(mine)} KV slots, sequence {j} "
                        f"{len(theirs)}; {len(both)} of them are the same slots: {both[:12]}",
                        f"the first divergence is {label(case.first)} at step "
                        f"{case.first.step} of sequence {i}"]
            return make("batch_kv_shared", f"{_pair_text(i, j)} share KV-cache slots "
                        f"({len(both)} slots written by both): one overwrites the other's "
                        "keys and values", _KV_CHECKS, evidence, sequences=[i, j],
                        slots=both[:64])
    return None


def _reads_other(case: Case, info: dict[str, Any], i: int) -> Diagnosis | None:
    written = _written(info)
    mine = written.get(i, set())
    for step, st in enumerate(_steps(info)[: case.first.step + 1]):
        read = {int(s) for s in st.get("read", [])} - {_NULL_SLOT} - mine
        for j, theirs in sorted(written.items()):
            foreign = sorted(read & theirs) if j != i else []
            if foreign:
                evidence = [f"at its step {step} (batch step {st.get('batch_step')}), "
                            f"sequence {i}'s attention read {len(foreign)} KV slots that "
                            f"sequence {j} wrote and it did not: {foreign[:12]}",
                            f"sequence {i} joined at batch step "
                            f"{(info.get('join_at') or [0] * (i + 1))[i]}"]
                return make("batch_leak", f"sequence {i} reads sequence {j}'s KV cache "
                            f"(step {step}): a cross-sequence leak", _READ_CHECKS, evidence,
                            sequences=[i, j], step=step, slots=foreign[:64])
    return None


def _token_of(path: str, step: int) -> int | None:
    try:
        with open_dump(path) as dump:
            tokens = dump.meta.get("generated_token_ids") or []
    except Exception:  # an unreadable reference: no evidence from it
        return None
    return int(tokens[step]) if 0 <= step < len(tokens) else None


def _token_leak(case: Case, info: dict[str, Any], i: int) -> Diagnosis | None:
    f, tokens = case.first, case.tokens
    if tokens is None or not tokens.candidate or case.role(f).op != K.LOGITS:
        return None
    steps, refs = _steps(info), info.get("references") or []
    if f.step >= len(tokens.candidate) or f.step >= len(steps):
        return None
    chosen = tokens.candidate[f.step]
    own = tokens.reference[f.step] if tokens.reference and f.step < len(tokens.reference) \
        else None
    batch_step = int(steps[f.step].get("batch_step", f.step))
    join = info.get("join_at") or [0] * len(refs)
    for j, path in enumerate(refs):
        if j == i or chosen == own:
            continue
        theirs = _token_of(str(path), batch_step - int(join[j]))
        if theirs == chosen:
            evidence = [f"at step {f.step} sequence {i} chose token {chosen}; its solo "
                        f"reference chose {own}, sequence {j}'s solo reference chose "
                        f"{theirs} at the same batch step",
                        f"the logits of sequence {i} agree with its reference ({label(f)}: "
                        f"relative L2 {fmt(f.error)})"]
            return make("batch_leak", f"sequence {i} took sequence {j}'s token at step "
                        f"{f.step}: its token comes from the wrong row of the batch",
                        _TOKEN_CHECKS, evidence, sequences=[i, j], step=f.step,
                        chosen=chosen, reference_token=own)
    return None


def _values_leak(case: Case, info: dict[str, Any], i: int) -> Diagnosis | None:
    """The candidate's tensor is another sequence's solo value at the same batch step."""
    f = case.first
    arrays, steps = case.arrays(f), _steps(info)
    refs, join = info.get("references") or [], info.get("join_at") or []
    if arrays is None or f.step >= len(steps) or len(join) != len(refs):
        return None
    batch_step = int(steps[f.step].get("batch_step", f.step))
    for j, path in enumerate(refs):
        if j == i:
            continue
        try:
            with open_dump(str(path)) as other:
                rec = other.get(batch_step - int(join[j]), f.ref_name, f.call)
                theirs = case.read(other, rec, f.ref_transform)
        except Exception:  # an unreadable reference: no evidence from it
            continue
        if theirs is None or theirs.size != arrays[1].size:
            continue
        err = ev.rel_error(theirs, arrays[1])
        if case.explains(err):
            evidence = [f"sequence {i}'s {label(f)} at step {f.step} differs from its own "
                        f"reference by {fmt(f.error)} and equals sequence {j}'s reference at "
                        f"the same batch step (relative L2 {fmt(err)})"]
            return make("batch_leak", f"sequence {i}'s {label(f)} is sequence {j}'s: a "
                        "cross-sequence leak", _TOKEN_CHECKS + _READ_CHECKS, evidence,
                        sequences=[i, j], step=f.step, error_to_other=err)
    return None


def _padded_by(info: dict[str, Any], step: int) -> tuple[int, int | None]:
    """(padding tokens of this sequence's row at ``step``, the row sequence that set the
    width)."""
    steps = _steps(info)
    if step >= len(steps) or steps[step].get("packed"):  # packed: no padding
        return 0, None
    st = steps[step]
    pad = int(st.get("width", 0)) - int(st.get("length", 0))
    widest = st.get("widest")
    return pad, None if widest is None else int(widest)


def _positions(case: Case, info: dict[str, Any], i: int) -> Diagnosis | None:
    f = case.first
    pad, j = _padded_by(info, f.step)
    if pad <= 0 or info.get("padding") != "left" or case.role(f).op not in (K.Q_ROPE, K.K_ROPE):
        return None
    pre = pre_rope(case)
    if pre is None or not case.agrees(pre):
        return None
    evidence = [f"sequence {i} was padded by {pad} tokens on the left at step {f.step} "
                f"(to the width of sequence {j})",
                f"before RoPE, {label(pre)} agrees (relative L2 {fmt(pre.error)}); after "
                f"RoPE, {label(f)} does not ({fmt(f.error)})"]
    detail: dict[str, Any] = {"sequences": [i, j], "padding": pad, "step": f.step}
    views = rope_views(case, pre)
    if views is not None and len(views[0]) > 1:
        x, r, c, d = views
        pairing = pairing_of(x, r)
        if pairing is not None:
            angles = ev.rotation(x, r, pairing)[0]
            base = ev.rope_base(angles[1], d)
            start = int(_steps(info)[f.step].get("position", 0))
            if base:
                moved = ev.rotate(x, ev.rope_angles(np.arange(len(x)) + start + pad, base, d),
                                  pairing)
                after = ev.rel_error(c, moved)
                detail["error_after"] = after
                evidence.append(f"rotating the reference's input by positions moved by {pad} "
                                f"reproduces the candidate: relative L2 {fmt(after)}")
    return make("batch_positions", f"sequence {i}'s positions are moved by its {pad} left "
                f"padding tokens (padded for sequence {j}): RoPE rotates by the column, not "
                "the token's index", _POS_CHECKS, evidence, **detail)


def _mask(case: Case, info: dict[str, Any], i: int) -> Diagnosis | None:
    f = case.first
    pad, j = _padded_by(info, f.step)
    if pad <= 0 or case.role(f).op not in (K.ATTN_HEADS, K.ATTN, K.ATTN_OUT):
        return None
    layer = case.role(f).layer
    inputs = [case.find((op,), layer) for op in (K.Q_ROPE, K.K_ROPE, K.V)]
    if any(p is None or not case.agrees(p) for p in inputs):
        return None
    sentence, _ = input_sentence(case, f)
    evidence = [f"sequence {i} was padded by {pad} tokens ({info.get('padding')}) at step "
                f"{f.step} (to the width of sequence {j})",
                "q and k after RoPE and v agree: "
                + ", ".join(f"{label(p)} {fmt(p.error)}" for p in inputs if p is not None),
                f"{label(f)} differs (relative L2 {fmt(f.error)}); {sentence}"]
    return make("batch_mask", f"sequence {i}'s attention lets its {pad} padding tokens in "
                f"(padded for sequence {j}): the mask misses the padding", _MASK_CHECKS,
                evidence, sequences=[i, j], padding=pad, step=f.step)


_PACKED_CHECKS = ("the attention kernel's per-sequence boundaries: cu_seqlens (vLLM's "
                  "query_start_loc) given to the varlen kernel, not one causal mask over "
                  "the flat batch",
                  "each sequence's key range: its own cached tokens (seq_lens, its block "
                  "table row), starting at its own first token")


@dataclass(frozen=True)
class _Packed:
    """One sequence's segment of a packed batch step, read from its split dump's metadata."""

    sequence: int
    own_step: int  #: the step of its split dump
    start: int  #: its first token in the step's flat batch
    length: int
    position: int  #: its tokens before this segment
    prompt: int  #: its prompt's length

    @property
    def prefill(self) -> bool:
        return self.position < self.prompt


def _segments(meta: dict[str, Any], sequence: int) -> list[_Packed]:
    """A split dump's segments, one per step, from its metadata."""
    prompt = len(meta.get("prompt_token_ids") or ())
    return [_Packed(sequence, k, int(st.get("start", 0)), int(st.get("length", 0)),
                    int(st.get("position", 0)), prompt)
            for k, st in enumerate(_steps(meta.get("batch_sequence") or {}))]


@lru_cache(maxsize=4096)
def _split_segments(path: str, stamp: tuple[int, int]) -> tuple[tuple[int, _Packed], ...]:
    """A split dump's segments, each with its batch step (read once per file version: every
    diverged sequence of a batch reads every other's)."""
    with open_dump(path) as dump:
        meta = dict(dump.meta)
    steps = _steps(meta.get("batch_sequence") or {})
    seq = int((meta.get("batch_sequence") or {}).get("sequence", -1))
    return tuple((int(st.get("batch_step", -1)), p)
                 for p, st in zip(_segments(meta, seq), steps))


def _packed_at(info: dict[str, Any], batch_step: int) -> list[_Packed]:
    """Every sequence's segment of one batch step, in flat order."""
    out = []
    for path in info.get("candidates") or []:
        try:
            st = os.stat(path)
            found = _split_segments(str(path), (st.st_mtime_ns, st.st_size))
        except Exception:  # an unreadable split dump: that sequence is left out
            continue
        out += [p for b, p in found if b == batch_step]
    return sorted(out, key=lambda p: p.start)


def _token_rows(case: Case, path: str, step: int, name: str, call: int) -> np.ndarray | None:
    """A record of the dump at ``path``, as (tokens, features): its token dim found across
    the dump's steps (heads and tokens can be the same size)."""
    try:
        with open_dump(path) as dump:
            dim = token_dim_across(dump, name, fed_per_step(dump))
            a = case.read(dump, dump.get(step, name, call), None)
    except Exception:  # an unreadable dump: no evidence from it
        return None
    if a is None or not isinstance(dim, int) or a.ndim <= dim:
        return None
    a = np.moveaxis(a, dim, 0)
    return a.reshape(a.shape[0], -1)


def _solo_rows(case: Case, path: str, seg: _Packed, name: str, call: int) -> np.ndarray | None:
    """A segment's tokens in its sequence's solo run (prefill at step 0, then one token a
    step), as (tokens, features)."""
    if seg.position + seg.length <= seg.prompt:
        step, rows = 0, slice(seg.position, seg.position + seg.length)
    else:
        step, rows = seg.position - seg.prompt + 1, slice(0, seg.length)
    out = _token_rows(case, path, step, name, call)
    return None if out is None or out[rows].shape[0] != seg.length else out[rows]


def _segment_error(case: Case, info: dict[str, Any], seg: _Packed) -> float | None:
    """The first divergence's op over one segment: the candidate's split step against the
    same tokens of the sequence's solo reference."""
    f = case.first
    cands, refs = info.get("candidates") or [], info.get("references") or []
    if seg.sequence >= min(len(cands), len(refs)):
        return None
    r = _solo_rows(case, str(refs[seg.sequence]), seg, f.ref_name, f.call)
    c = _token_rows(case, str(cands[seg.sequence]), seg.own_step, f.cand_name, f.call)
    return None if r is None or c is None or r.shape != c.shape else ev.rel_error(r, c)


def _flat_attention(case: Case, info: dict[str, Any], mine: _Packed, segs: list[_Packed],
                    inputs: list[PairResult]) -> float | None:
    """How far from the candidate's attention output a segment's queries land when they
    attend, under one causal mask over the flat batch, to every key of the step from the
    batch's first token through its own (the reference's q, k and v, which agree)."""
    d = case.head_dim()
    refs, cands = info.get("references") or [], info.get("candidates") or []
    if not d or len(refs) <= max(p.sequence for p in segs) or mine.sequence >= len(cands):
        return None
    q_pair, k_pair, v_pair = inputs
    q = _solo_rows(case, str(refs[mine.sequence]), mine, q_pair.ref_name, q_pair.call)
    out = _token_rows(case, str(cands[mine.sequence]), mine.own_step, case.first.cand_name,
                      case.first.call)
    keys, values = [], []
    for p in (p for p in segs if p.start <= mine.start):
        k = _solo_rows(case, str(refs[p.sequence]), p, k_pair.ref_name, k_pair.call)
        v = _solo_rows(case, str(refs[p.sequence]), p, v_pair.ref_name, v_pair.call)
        if k is None or v is None or k.shape[1] % d or v.shape != k.shape:
            return None
        keys.append(k.reshape(p.length, -1, d))
        values.append(v.reshape(p.length, -1, d))
    if q is None or out is None or q.shape[1] % d or out.shape != q.shape:
        return None
    q3 = q.reshape(mine.length, -1, d)
    if q3.shape[1] % keys[0].shape[1]:
        return None
    # the reference's own scale and soft cap (its metadata), over the flat batch's keys
    meta = case.ref.meta
    flat = attend(q3, np.concatenate(keys), np.concatenate(values),
                  float(meta.get("attn_scale") or d ** -0.5), meta.get("attn_softcap"), None)
    return ev.rel_error(flat, out)


def _packed_mask(case: Case, info: dict[str, Any], i: int) -> Diagnosis | None:
    """A packed sequence's attention departs, while its q, k and v agree, at a segment
    packed after other sequences' tokens, and either those tokens, attended to as well,
    reproduce it, or a sequence of the same kind (prefill or decode) packed before it in
    that step agrees."""
    f = case.first
    steps = _steps(info)
    if not steps or not all(st.get("packed") for st in steps) or \
            case.role(f).op not in (K.ATTN_HEADS, K.ATTN, K.ATTN_OUT):
        return None
    layer = case.role(f).layer
    found = [case.find((op,), layer) for op in (K.Q_ROPE, K.K_ROPE, K.V)]
    inputs = [p for p in found if p is not None]
    if len(inputs) < 3 or not all(case.agrees(p) for p in inputs):
        return None
    # the first of its segments (a prompt, a chunk, a decode token) where the op departs
    for mine in _segments(dict(case.cand.meta), i):
        err = _segment_error(case, info, mine)
        if err is None:
            return None
        if err > case.good():
            break
    else:
        return None
    if mine.start == 0:
        return None  # packed first in its step: nothing was packed before it
    batch_step = int(steps[mine.own_step].get("batch_step", mine.own_step))
    segs = _packed_at(info, batch_step)
    what = ("its prompt" if mine.length == mine.prompt else
            f"its prompt's tokens {mine.position}-{mine.position + mine.length - 1}")
    if not mine.prefill:
        what = f"its decode token at position {mine.position}"
    evidence = [f"at batch step {batch_step}, {what} came after {mine.start} tokens of "
                f"sequences {[p.sequence for p in segs if p.start < mine.start]} in one flat "
                f"batch; there {label(f)} departs (relative L2 {fmt(err)})",
                "q and k after RoPE and v agree: "
                + ", ".join(f"{label(p)} {fmt(p.error)}" for p in inputs)]
    detail: dict[str, Any] = {"sequences": [p.sequence for p in segs], "step": f.step,
                              "batch_step": batch_step, "packed_after": mine.start,
                              "segment_error": err}
    flat = _flat_attention(case, info, mine, segs, inputs)
    if flat is not None and case.explains(flat):
        evidence.append(f"its queries attending to the step's keys from the batch's first "
                        f"token through its own, under one causal mask, reproduce the "
                        f"candidate: relative L2 {fmt(flat)}")
        detail["error_flat_mask"] = flat
    alike = [p for p in segs if p.start < mine.start and p.prefill == mine.prefill]
    if alike:
        other = _segment_error(case, info, alike[0])
        if other is not None and other <= case.good():
            evidence.append(f"sequence {alike[0].sequence}, packed before it in that step "
                            f"and also in {'prefill' if mine.prefill else 'decode'}, agrees "
                            f"at the same op (relative L2 {fmt(other)})")
            detail["packed_before_error"] = other
    if "error_flat_mask" not in detail and "packed_before_error" not in detail:
        return None
    return make("batch_mask", f"sequence {i}'s attention lets in the {mine.start} tokens "
                f"packed before it in the flat batch (batch step {batch_step}): the kernel "
                "does not keep the sequences apart", _PACKED_CHECKS, evidence, **detail)


@rule(*BATCH_KINDS)
def batch(case: Case) -> Diagnosis | None:
    """A sequence split from a batched run (``batch_sequence`` in the candidate's metadata)
    diverges: shared KV slots, another sequence's slots read or token taken, positions moved
    by left padding, padding let into attention."""
    info = case.cand.meta.get("batch_sequence")
    if not isinstance(info, dict) or not isinstance(info.get("sequence"), int):
        return None
    i = int(info["sequence"])
    for test in (_shared, _reads_other, _token_leak, _values_leak, _positions, _mask,
                 _packed_mask):
        found = test(case, info, i)
        if found is not None:
            return found
    return None
