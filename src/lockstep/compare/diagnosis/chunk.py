"""The ``chunk`` rule: a prefill fed in chunks (align.chunks joined them into one step) whose
first chunk agrees while a later one does not, or a prefill computed after a cached prefix
(align.prefix cut the other side's step) that departs at its attention or RoPE: what tokens
that do not start at position 0 do differently (their attention over the cached ones, their
positions)."""

from __future__ import annotations

import numpy as np

from ...align.chunks import ChunkGroup, chunk_errors
from ...align.kinds import Kind as K
from ...align.steps import POSITION_NAMES
from ...textfmt import fmt
from ..case import Case, label
from ..ops import ATTN_OUT
from .model import Diagnosis, make, rule

__all__ = ["chunk"]

_ROPE = (K.Q_ROPE, K.K_ROPE)


def _group(case: Case) -> ChunkGroup | None:
    """The joined group of the first divergence's record, on either side."""
    for rec in (case.cand_record(case.first), case.ref_record(case.first)):
        extra = rec.extra if rec is not None else {}
        steps, sizes = extra.get("chunks"), extra.get("chunk_tokens")
        if isinstance(steps, list) and isinstance(sizes, list) and len(steps) == len(sizes):
            return ChunkGroup(tuple(steps), tuple(sizes), extra.get("chunk_prefill") is not False)
    return None


def _cached(case: Case) -> tuple[int, str]:
    """The tokens of a cached prefix the compared step leaves out (0: none), and the side
    that took them from its cache (the other side's record was cut)."""
    for rec, side in ((case.ref_record(case.first), "candidate"),
                      (case.cand_record(case.first), "reference")):
        span = rec.extra.get("from_token") if rec is not None else None
        if isinstance(span, list) and span and type(span[0]) is int and span[0] > 0:
            return span[0], side
    return 0, ""


def _positions(case: Case, group: ChunkGroup, base: int) -> list[str]:
    """Where the candidate's recorded positions of the step do not go on one by one from
    ``base``: the chunks whose positions are off, in words (with the values)."""
    step = case.first.step
    rec = next((r for r in case.cand.records if r.step == step and r.has_data and
                (r.name in POSITION_NAMES or r.name.rsplit(".", 1)[-1] in POSITION_NAMES)),
               None)
    if rec is None or rec.numel != group.tokens[-1]:
        return []
    pos = np.asarray(case.cand.read(rec)).reshape(-1).astype(np.int64)
    out = []
    for k in range(len(group.sizes)):
        a, b = group.tokens[k], group.tokens[k + 1]
        if not np.array_equal(pos[a:b], np.arange(base + a, base + b)):
            shown = ", ".join(str(int(v)) for v in pos[a:b][:8])
            what = f"chunk {k + 1} ({group.span(k)} of the prefill)" if len(group.sizes) > 1 \
                else f"its {b - a} tokens"
            out.append(f"the candidate fed {what} positions {shown}"
                       f"{', ...' if b - a > 8 else ''}, not from {base + a}")
    return out


def _checks(case: Case, first_at: int, off: list[str], which: str) -> list[str] | None:
    """What to check, by the op the divergence is at (None: not an op the cache or the
    positions of ``which`` tokens explain)."""
    op = case.role(case.first).op
    if off or op in _ROPE:
        return [f"the positions of {which}: they go on from {first_at}, not from 0",
                f"the RoPE of {which}, which does not start at position 0 (its cos/sin rows)"]
    if op in ATTN_OUT:
        return [f"the attention mask of {which}: query i sees every cached key and its own "
                "tokens' keys up to i (aligned bottom-right; torch's is_causal aligns "
                "top-left when there are fewer queries than keys)",
                "the cached keys and values it reads back (their slots, the block table, "
                "the context length: cached tokens and new ones)",
                f"the positions of {which}: they go on from {first_at}"]
    return None


@rule("chunk")
def chunk(case: Case) -> Diagnosis | None:
    f = case.first
    arrays = case.arrays(f)
    if arrays is None:
        return None
    cached, side = _cached(case)
    group = _group(case)
    if group is None:  # one step computed after a cached prefix
        if not cached:
            return None
        whole = ChunkGroup((f.step,), (int(np.squeeze(arrays[0]).shape[0]),))
        off = _positions(case, whole, cached)
        checks = _checks(case, cached, off, "the tokens after the cached prefix")
        if checks is None:
            return None
        title = (f"the prefill computed after a cached prefix of {cached} tokens departs at "
                 f"{label(f)}")
        evidence = [f"the {side} took tokens 0-{cached - 1} from its prefix cache: every "
                    "token it computed attends to them through the cache", *off]
        return make("chunk", title, checks, evidence, cached_prefix=cached, chunk=None,
                    chunks=1)
    if not group.prefill:  # decode steps the other side fed at once: speculative decoding
        return _verify_step(case, group)
    errors = chunk_errors(group, *arrays)
    tol = max(case.good(f), f.tol)
    if errors is None or not errors[0][1] <= tol:  # the first chunk differs too: not this
        return None
    later = [k for k, e in errors if not e <= tol]
    if not later:
        return None
    k = later[0]
    edges = group.tokens
    n = len(group.sizes)
    title = (f"the prefill fed in {n} chunks agrees on its first chunk and departs at chunk "
             f"{k + 1} ({group.span(k)}), at {label(f)}")
    evidence = [f"relative L2 of {label(f)} per chunk: " + "; ".join(
        f"chunk {j + 1} ({group.span(j)}) {fmt(e)}" for j, e in errors),
        "the first chunk, which " + (f"reads a cached prefix of {cached} tokens" if cached
                                     else "starts at position 0 and reads no cache")
        + f", agrees (tolerance {fmt(tol)})"]
    off = _positions(case, group, cached)
    evidence += off
    checks = _checks(case, cached + edges[k], off, f"chunk {k + 1}") or [
        f"what {label(f)} does for a chunk that does not start at position 0",
        "the attention of a later chunk over the cached earlier ones (its mask, the keys and "
        "values it reads back)"]
    return make("chunk", title, checks, evidence, chunk=k, chunks=n, cached_prefix=cached,
                chunk_errors=[e for _, e in errors], tokens=list(edges))


def _verify_step(case: Case, group: ChunkGroup) -> Diagnosis | None:
    """A decode step that fed several tokens at once (the token and its drafts) departs at
    its attention, where one side fed the same tokens one per step: the mask among them, or
    the KV cache (which a later one-token decode step, compared too, tells apart)."""
    f = case.first
    if case.role(f).op not in ATTN_OUT:
        return None
    n = sum(group.sizes)
    one_by_one = "reference" if _joined_on(case.ref_record(f)) else "candidate"
    at_once = "candidate" if one_by_one == "reference" else "reference"
    title = (f"the {at_once}'s decode step of {n} tokens at once (speculative decoding: a "
             f"token and the drafts it kept) departs at {label(f)}")
    evidence = [f"the {one_by_one} fed the same tokens one per step (steps "
                f"{', '.join(map(str, group.steps))})"]
    given = case.input_of(f)
    if given is not None and case.agrees(given):
        evidence.append(f"its input {label(given)} agrees ({fmt(given.error)})")
    arrays = case.arrays(f)
    errors = chunk_errors(group, *arrays) if arrays is not None else None
    if errors is not None:
        evidence.append(f"relative L2 of {label(f)} per token: " + "; ".join(
            f"step {group.steps[k]} {fmt(e)}" for k, e in errors))
    # a later decode step fed one token on both sides: the same op there tells the mask
    # among several tokens (that step is right) from the KV cache (that step is wrong too)
    single = next((q for s in sorted({p.step for p in case.results if p.step > f.step})
                   if (q := case.same_name(f, s)) is not None
                   and not _joined_on(case.ref_record(q))
                   and not _joined_on(case.cand_record(q))), None)
    mask = (f"the attention mask of a decode step fed {n} tokens: query i sees every cached "
            "key and the step's own keys up to i (aligned bottom-right; torch's is_causal "
            "aligns top-left when there are fewer queries than keys)")
    cache = ("the slots the step's tokens' keys and values are written to, and the context "
             "length it reads (the cached tokens and all of the step's)")
    checks = [mask, cache]
    if single is not None:
        if case.agrees(single):
            evidence.append(f"at step {single.step}, fed one token on both sides, it agrees "
                            f"({fmt(single.error)}): what differs is fed several at once")
        else:
            evidence.append(f"at step {single.step}, fed one token on both sides, it differs "
                            f"too ({fmt(single.error)}): not the several tokens alone")
            checks = [cache, mask]
    checks.append("the positions of the drafts: one after the other from the step's first")
    return make("chunk", title, checks, evidence, chunk=None, chunks=len(group.sizes),
                cached_prefix=0, speculative=True, tokens=list(group.tokens),
                one_token_step=single.step if single is not None else None)


def _joined_on(rec: object) -> bool:
    extra = getattr(rec, "extra", None)
    return isinstance(extra, dict) and "chunks" in extra
