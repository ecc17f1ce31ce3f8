"""The ``chunk`` rule: a prefill fed in chunks (align.chunks joined them into one step)
whose first chunk agrees while a later one does not: what a chunk that does not start at
position 0 does differently (its attention over the cached earlier chunks, its positions)."""

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
            return ChunkGroup(tuple(steps), tuple(sizes))
    return None


def _positions(case: Case, group: ChunkGroup) -> list[str]:
    """Where the candidate's recorded positions of the joined step do not go on one by one
    from its first: the chunks whose positions are off, in words (with the values)."""
    step = case.first.step
    rec = next((r for r in case.cand.records if r.step == step and r.has_data and
                (r.name in POSITION_NAMES or r.name.rsplit(".", 1)[-1] in POSITION_NAMES)),
               None)
    if rec is None or rec.numel != group.tokens[-1]:
        return []
    pos = np.asarray(case.cand.read(rec)).reshape(-1).astype(np.int64)
    base = int(pos[0])  # the first chunk's first position: a cached prefix's length
    out = []
    for k in range(len(group.sizes)):
        a, b = group.tokens[k], group.tokens[k + 1]
        if not np.array_equal(pos[a:b], np.arange(base + a, base + b)):
            shown = ", ".join(str(int(v)) for v in pos[a:b][:8])
            out.append(f"the candidate fed chunk {k + 1} ({group.span(k)} of the prefill) "
                       f"positions {shown}{', ...' if b - a > 8 else ''}")
    return out


@rule("chunk")
def chunk(case: Case) -> Diagnosis | None:
    f = case.first
    group = _group(case)
    arrays = case.arrays(f)
    if group is None or arrays is None:
        return None
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
        f"the first chunk, which starts at position 0 and reads no cache, agrees "
        f"(tolerance {fmt(tol)})"]
    off = _positions(case, group)
    evidence += off
    op = case.role(f).op
    if off or op in _ROPE:
        checks = [f"the positions of chunk {k + 1}: they go on from the previous chunk's end "
                  f"({edges[k]}), not from 0",
                  "the RoPE of a chunk that does not start at position 0 (its cos/sin rows)"]
    elif op in ATTN_OUT:
        checks = ["the attention mask of a later chunk: query i sees every cached key and "
                  "its own chunk's keys up to i (aligned bottom-right; torch's is_causal "
                  "aligns top-left when there are fewer queries than keys)",
                  "the keys and values of the earlier chunks it reads back from the cache "
                  "(their slots, the block table, the context length)",
                  f"the positions of chunk {k + 1}: they go on from {edges[k]}"]
    else:
        checks = [f"what {label(f)} does for a chunk that does not start at position 0",
                  "the attention of a later chunk over the cached earlier ones (its mask, the "
                  "keys and values it reads back)"]
    return make("chunk", title, checks, evidence, chunk=k, chunks=n,
                chunk_errors=[e for _, e in errors], tokens=list(edges))
