"""A prefill fed in chunks: the steps of one side that fed, in several forwards, tokens the
other side fed in one, joined into one step before the steps are matched.

vLLM and SGLang split a long prompt into chunks (chunked prefill), and llama.cpp a long batch
into ubatches: each chunk is a forward, so a step of its own in the dump, holding that
chunk's rows alone. Compared step by step, the last chunk stands for the whole prefill and
the earlier chunks are left out; a bug in how a later chunk attends to the cached earlier
ones is then found late, or not at all.

Which steps are one prefill is decided from what each step was fed (align.steps), never from
a count: a step is joined to the one before it when the other side fed, in one step, the tokens on
both sides of that boundary: the ids fed so far in this sequence, then this step's. The
positions recorded are not asked (a later chunk fed positions from 0 again is a bug to find,
not another sequence). Both sides are joined that way, so a reference cut into 512-token
ubatches and a candidate cut into 2048-token chunks meet at their common boundaries.

Each record of a joined group is, by one rule:

* its chunks' records concatenated along their token dim (the dim of each chunk's record
  whose size is the number of tokens that chunk was fed): per-token activations;
* stacked along a new first dim, when a prompt was fed one token per step and each step's
  record is that token's vector (the same shape each time, no dim of size 1);
* the last chunk's record alone, when every chunk recorded the same shape (the logits of the
  last position, a sampled token, a state) or one grown to hold every token so far (keys and
  values read back from a cache);
* else left out and listed: the comparison is then incomplete, never a match.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any, Sequence

import numpy as np

from ..display import safe
from ..store.reader import Dump, Record
from .composed import ComposedDump, Parts, bounds, slice_errors
from .cuts import token_dim
from .steps import Fed, fed_per_step, histories
from .transforms import squeeze

__all__ = ["Chunking", "ChunkGroup", "join_chunks", "chunk_errors"]

_SHOWN = 8


@dataclass(frozen=True)
class ChunkGroup:
    """Steps of one side joined into one: a prefill fed in chunks."""

    steps: tuple[int, ...]  #: the recorded steps, in order; the first names the joined step
    sizes: tuple[int, ...]  #: tokens each step was fed
    prefill: bool = True  #: the first step starts its sequence (else: decode steps joined)

    @property
    def step(self) -> int:
        return self.steps[0]

    @property
    def tokens(self) -> tuple[int, ...]:
        """Where each chunk starts in the joined step's tokens, then the end."""
        return bounds([(n,) for n in self.sizes], 0)

    def chunk_of(self, row: int) -> int:
        """The index of the chunk holding token ``row`` of the joined step."""
        edges = self.tokens
        return next(k for k in range(len(self.sizes)) if edges[k] <= row < edges[k + 1])

    def span(self, k: int) -> str:
        """Chunk ``k``'s tokens in the joined step, in words: "tokens 4-7", "token 8"."""
        a, b = self.tokens[k], self.tokens[k + 1] - 1
        return f"token {a}" if a == b else f"tokens {a}-{b}"

    def describe(self) -> str:
        first, last = self.steps[0], self.steps[-1]
        span = f"steps {first}-{last}" if self.steps == tuple(range(first, last + 1)) else \
            "steps " + ", ".join(map(str, self.steps))
        if not self.prefill:
            return (f"decode {span} fed {'+'.join(map(str, self.sizes))} tokens that the "
                    f"other side fed in one step (speculative decoding), joined as step "
                    f"{first}")
        return (f"{span} are one prefill fed in {len(self.steps)} chunks "
                f"({'+'.join(map(str, self.sizes))} tokens), joined as step {first}")

    def part(self, k: int) -> str:
        """Part ``k`` in words: "chunk 2 of 3 (step 1, tokens 4-7)", or for joined decode
        steps "step 3"."""
        if not self.prefill:
            return f"step {self.steps[k]}"
        return f"chunk {k + 1} of {len(self.sizes)} (step {self.steps[k]}, {self.span(k)})"


@dataclass(frozen=True)
class Chunking:
    """How one side's chunked prefills were joined, and the records that could not be."""

    side: str  #: "reference" or "candidate"
    groups: tuple[ChunkGroup, ...]
    rules: tuple[tuple[str, int], ...]  #: (rule, records) counts: "concatenated", "last chunk"
    left_out: tuple[tuple[int, str, str], ...] = ()  #: (joined step, name, why)

    def group_of(self, step: int) -> ChunkGroup | None:
        return next((g for g in self.groups if g.step == step), None)

    def lines(self) -> list[str]:
        """What the terminal report prints."""
        how = ", ".join(f"{n} {rule}" for rule, n in self.rules if n)
        out = [f"the {self.side}'s {g.describe()}" for g in self.groups[:_SHOWN]]
        if len(self.groups) > _SHOWN:
            out.append(f"(and {len(self.groups) - _SHOWN} more chunked prefills)")
        out.append(f"records of the joined steps: {how}")
        for step, name, why in self.left_out[:_SHOWN]:
            out.append(f"not joined, so not compared: {safe(name or '(root)')}@{step}: {why}")
        return out

    def as_dict(self) -> dict[str, Any]:
        return {"side": self.side,
                "groups": [{"steps": list(g.steps), "tokens": list(g.sizes),
                            "prefill": g.prefill} for g in self.groups],
                "records": dict(self.rules),
                "left_out": [{"step": s, "name": n, "why": w} for s, n, w in self.left_out]}


def _spans(fed: dict[int, Fed],
           hist: dict[int, tuple[int, ...] | None]) -> list[tuple[tuple[int, ...], int]]:
    """(history, where the step's own ids start in it) of the steps fed several tokens: the
    only ones that can hold a boundary of the other side inside them."""
    return [(h, len(h) - len(ids)) for s, (ids, _) in fed.items()
            if ids is not None and len(ids) > 1 and (h := hist[s]) is not None]


def _straddled(known: tuple[int, ...], more: tuple[int, ...],
               spans: list[tuple[tuple[int, ...], int]]) -> bool:
    """The other side fed, in one step, the last token of ``known`` and the first of
    ``more``: some step of it was fed across the boundary after ``known``."""
    cut = len(known)
    for h, start in spans:  # (cheap tests first: many sequences make many spans)
        if start < cut < len(h) and h[cut] == more[0] and h[cut - 1] == known[-1] and \
                h[:cut] == known and h[cut:cut + len(more)] == more[:len(h) - cut]:
            return True
    return False


def _groups(fed: dict[int, Fed], other_fed: dict[int, Fed]) -> list[ChunkGroup]:
    """The steps of ``fed`` that the other side fed at once (module doc)."""
    hist = histories(fed)
    spans = _spans(other_fed, histories(other_fed))
    if not spans:
        return []
    groups: list[ChunkGroup] = []
    steps = list(fed)

    def group(run: list[int]) -> ChunkGroup:
        h, ids = hist[run[0]], fed[run[0]][0]
        return ChunkGroup(tuple(run), tuple(len(fed[s][0] or ()) for s in run),
                          prefill=h is None or ids is None or len(h) == len(ids))

    run = [steps[0]] if steps else []
    so_far = hist[steps[0]] if steps else None
    for t in steps[1:]:
        ids = fed[t][0]
        # its positions are not asked: a chunk fed positions from 0 again is a bug to find
        if ids and so_far is not None and _straddled(so_far, ids, spans):
            run.append(t)
            so_far = so_far + ids
        else:
            if len(run) > 1:
                groups.append(group(run))
            run, so_far = [t], hist[t]
    if len(run) > 1:
        groups.append(group(run))
    return groups


def _grown(shapes: Sequence[tuple[int, ...]], sizes: Sequence[int]) -> bool:
    """Each chunk's record holds every token fed so far (keys read back from the cache): along
    one dim it grows by each chunk's tokens, the other dims the same."""
    nd = len(shapes[-1])
    if any(len(s) != nd for s in shapes):
        return False
    return any(shapes[0][d] >= sizes[0] and all(
        b[d] - a[d] == n and a[:d] + a[d + 1:] == b[:d] + b[d + 1:]
        for a, b, n in zip(shapes, shapes[1:], sizes[1:])) for d in range(nd))


def _join(group: ChunkGroup, recs: list[Record | None]) -> tuple[str, int | None] | str:
    """("cat", dim), ("stack", None) or ("last", None) for one key's records across the
    group's chunks, or why it cannot be joined."""
    last = recs[-1]
    present = [r for r in recs if r is not None]
    if last is None:
        where = ", ".join(str(s) for s, r in zip(group.steps, recs) if r is not None)
        return f"recorded at step(s) {where} but not at the prefill's last chunk"
    if len(present) < len(recs):
        if all(r.shape == last.shape for r in present):
            return "last", None
        return "recorded at some chunks only, with shapes that differ"
    shapes = [r.shape for r in present]
    if len({r.dtype for r in present}) > 1:
        return f"its chunks recorded it in different dtypes: {sorted({r.dtype for r in present})}"
    dim = token_dim(shapes, group.sizes)
    if isinstance(dim, str):
        return dim
    if dim is not None:
        if not all(r.has_data for r in present):
            return "recorded as statistics only: its chunks cannot be concatenated"
        return "cat", dim
    if set(group.sizes) == {1} and all(s == shapes[-1] for s in shapes) and \
            1 not in shapes[-1] and group.prefill:
        if not all(r.has_data for r in present):
            return "recorded as statistics only: its steps cannot be stacked"
        return "stack", None  # a prompt fed one token per step: one token's vector each
    if all(s == shapes[-1] for s in shapes) or _grown(shapes, group.sizes):
        return "last", None
    return (f"its shapes {[list(s) for s in shapes]} neither concatenate along the tokens "
            f"each chunk was fed ({list(group.sizes)}) nor stay the same")


def _joined(dump: Dump, groups: list[ChunkGroup], side: str) -> tuple[Dump, Chunking]:
    by_step = {s: g for g in groups for s in g.steps}
    keyed: dict[tuple[int, str, int], Record] = {r.key: r for r in dump.records}
    records: list[Record] = []
    parts: dict[int, Parts] = {}
    left: list[tuple[int, str, str]] = []
    counts = {"concatenated": 0, "stacked": 0, "last chunk": 0}
    done: set[tuple[int, str, int]] = set()
    for r in dump.records:
        g = by_step.get(r.step)
        if g is None:
            records.append(r)
            parts[r.seq] = Parts("one", ((dump, r),))
            continue
        key = (g.step, r.name, r.call)
        if key in done:
            continue
        done.add(key)
        recs = [keyed.get((s, r.name, r.call)) for s in g.steps]
        how = _join(g, recs)
        if isinstance(how, str):
            left.append((g.step, r.name, how))
            continue
        rule, dim = how
        last = recs[-1]
        assert last is not None
        if rule == "last":
            rec = replace(last, step=g.step)
            parts[rec.seq] = Parts("one", ((dump, last),))
            counts["last chunk"] += 1
        else:
            present = [x for x in recs if x is not None]
            if rule == "stack":
                shape = [len(present), *last.shape]
                joined = Parts("stack", tuple((dump, x) for x in present))
                counts["stacked"] += 1
            else:
                assert dim is not None
                shape = list(last.shape)
                shape[dim] = sum(x.shape[dim] for x in present)
                joined = Parts("cat", tuple((dump, x) for x in present), dim=dim)
                counts["concatenated"] += 1
            itemsize = (last.nbytes or 0) // max(1, last.numel)
            rec = replace(last, step=g.step, shape=tuple(shape), offset=joined.offset,
                          stats=None, nbytes=math.prod(shape) * itemsize,
                          extra={**last.extra, "chunks": list(g.steps),
                                 "chunk_tokens": list(g.sizes), "chunk_prefill": g.prefill})
            parts[rec.seq] = joined
        records.append(rec)
    records.sort(key=lambda x: (x.step, x.seq))
    view = ComposedDump(dump.path, dump.header, records, dict(dump.meta), dump.end, parts,
                        [dump])
    # joined decode steps go on with their sequence, though fed several ids (align.steps)
    view.continues = frozenset(g.step for g in groups if not g.prefill) | \
        getattr(dump, "continues", frozenset())
    return view, Chunking(side, tuple(groups), tuple(counts.items()), tuple(left))


def join_chunks(ref: Dump, cand: Dump) -> tuple[Dump, Dump, tuple[Chunking, ...]]:
    """Both sides with their chunked prefills joined (module doc); a side with none is
    returned as it is. The views share their dump's mapping: close the dumps, not them."""
    ref_fed, cand_fed = fed_per_step(ref), fed_per_step(cand)
    out: list[Chunking] = []
    sides = []
    for dump, fed, other, side in ((ref, ref_fed, cand_fed, "reference"),
                                   (cand, cand_fed, ref_fed, "candidate")):
        groups = _groups(fed, other)
        if groups:
            dump, chunking = _joined(dump, groups, side)
            out.append(chunking)
        sides.append(dump)
    return sides[0], sides[1], tuple(out)


def chunk_errors(group: ChunkGroup, ref: np.ndarray,
                 cand: np.ndarray) -> tuple[tuple[int, float], ...] | None:
    """Per chunk of a joined step, the relative error of its rows (both arrays in one
    layout but for size-1 dims, with one dim the size of the joined step's tokens); None
    when no single dim is."""
    ref, cand = squeeze(ref), squeeze(cand)  # (1, T, H) and (T, H) are one layout
    total = group.tokens[-1]
    dims = [d for d in range(ref.ndim) if ref.shape[d] == total]
    if ref.shape != cand.shape or len(dims) != 1:
        return None
    return slice_errors(ref, cand, dims[0], group.tokens)
