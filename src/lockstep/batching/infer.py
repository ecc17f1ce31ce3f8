"""Whose token is whose in a packed batch, measured from what each step was fed.

A serving engine shaped like vLLM runs one flat batch per step: the running sequences'
decode tokens and the prompts (or chunks of them) joining, back to back, with nothing in its
tensors that says where one sequence ends. lockstep knows what it asked for (each prompt, the
tokens each sequence was fed in decode: ``batch_request`` in the dump's metadata) and the dump
holds what each step was fed (its ``input_ids`` and ``positions``). Each step's flat tokens
are cut into segments, one per sequence, such that every segment is the next tokens that
sequence had to be fed: a run of its prompt (a whole prompt or a chunk) or its one next decode
token. The ids decide; the positions break ties between covers, and where the engine's
positions are not the ones the tokens sit at, the segment keeps them (``moved``), which is
evidence, not a reason to fail. A prompt's first segment may start past a prefix its engine
took from a cache (vLLM's prefix caching, SGLang's radix cache), where its recorded position
says so, and a sequence preempted and computed again (vLLM's recompute) is fed its tokens
again from where its recorded position says, up to its next decode token; tokens at the end
of a step that no sequence was due are the padding of a captured CUDA graph's batch size,
left to no sequence. A decode token may carry draft tokens after it (speculative decoding,
vLLM's n-gram or EAGLE proposers): the step verifies them, the sequence keeps those that are
its next tokens, and is fed the rest's positions again.

A declared layout (``batch.steps``, written by an engine that knows its rows) is checked
against the same fed ids (``check_declared``), never taken on its word.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from typing import Any, Sequence

from ..align.steps import fed_per_step
from ..errors import UsageError
from .layout import BatchLayout, Segment, StepLayout

__all__ = ["BatchRequest", "infer_layout", "check_declared", "REQUEST_KEY"]

REQUEST_KEY = "batch_request"  #: the metadata lockstep writes: what it asked of the engine
_BUDGET = 20_000  # cover attempts per step before the best found so far is taken


@dataclass(frozen=True)
class BatchRequest:
    """What lockstep asked the engine to run: the prompts, the step each was to join at,
    and the tokens each sequence was fed after its prompt (the forced ones, else its own)."""

    prompts: tuple[tuple[int, ...], ...]
    join_at: tuple[int, ...]
    fed: tuple[tuple[int, ...], ...]  #: per sequence, the decode tokens fed, in order
    chosen: tuple[tuple[int, ...], ...]  #: per sequence, the tokens the engine chose

    @classmethod
    def from_meta(cls, meta: dict[str, Any]) -> BatchRequest | None:
        info = meta.get(REQUEST_KEY)
        if not isinstance(info, dict):
            return None
        try:
            prompts = tuple(tuple(int(t) for t in p) for p in info["prompts"])
            joins = tuple(int(j) for j in info.get("join_at") or [0] * len(prompts))
            chosen = tuple(tuple(int(t) for t in c)
                           for c in info.get("generated_token_ids") or [()] * len(prompts))
            forced = info.get("forced_token_ids") or [None] * len(prompts)
        except (KeyError, TypeError, ValueError):
            raise UsageError("the dump's batch_request metadata is not lists of token "
                             "ids") from None
        if not len(joins) == len(chosen) == len(forced) == len(prompts):
            raise UsageError("the dump's batch_request metadata: prompts, join_at and tokens "
                             "differ in count")
        fed = []
        for own, force in zip(chosen, forced):
            force = [int(t) for t in force or ()]
            # decode step k feeds the forced token k where given, else the one chosen at k
            fed.append(tuple(force[k] if k < len(force) else own[k]
                             for k in range(max(len(own) - 1, 0))))
        return cls(prompts, joins, tuple(fed), chosen)

    @cached_property
    def _streams(self) -> tuple[tuple[int, ...], ...]:
        return tuple(p + f for p, f in zip(self.prompts, self.fed))

    def stream(self, i: int) -> tuple[int, ...]:
        """Every token sequence ``i`` was fed, by position."""
        return self._streams[i]


@dataclass(frozen=True)
class _Cut:
    sequence: int
    start: int
    length: int
    at: int  #: the position of its first token in its sequence
    drafts: int  #: draft tokens fed after its decode token (speculative decoding)


#: what a cover that leaves the step's last tokens to no sequence costs per token (a padded
#: batch: a captured CUDA graph's size); any cover of every token is taken before one, and
#: one that leaves fewer before one that leaves more
_TAIL = 1 << 20
_OFF = 2  #: what a segment the positions speak against costs
_DRAFT = 1  #: what each draft token costs: the cover with fewer wins, but it beats a moved


def _runs(req: BatchRequest, done: list[int], ids: Sequence[int],
          positions: Sequence[int] | None, j: int, i: int
          ) -> list[tuple[int, int, int, int]]:
    """The segments sequence ``i`` may have from flat token ``j``, as (length, the position
    of its first token, its cost, the drafts in it), the cheapest first, then the longest.
    A segment costs where the positions speak against it (moved off the tokens' own, or a
    run of its prompt that they run on past, or a start other than where the sequence was)
    and, less, for each draft it carries. Where its recorded position says so, a sequence
    not started yet may start past a prefix taken from a cache, and one that has started
    may be fed again from an earlier token up to its next (preempted and computed again).
    A decode token may be followed by draft tokens at the positions after it, any ids
    (speculative decoding: the step verifies them; those the sequence does not keep are fed
    again later)."""
    stream, n = req.stream(i), len(req.prompts[i])
    starts = [done[i]]
    where = int(positions[j]) if positions is not None else None
    if where is not None and done[i] == 0 and 0 < where < n:
        starts.append(where)  # the tokens before it came from a prefix cache
    if where is not None and 0 <= where < done[i]:
        starts.append(where)  # preempted, and computed again from there (vLLM's recompute)
    out = []
    for at in starts:
        if at >= len(stream) or stream[at] != ids[j]:
            continue
        # a run of its prompt ends anywhere the ids still agree; one computed again runs up
        # to its next decode token; a decode token is one per step (its predecessor is
        # chosen in this step)
        end = done[i] + 1 if at < done[i] else n
        if at >= end:  # a decode token, and any drafts at the positions after it
            most = 1
            while positions is not None and j + most < len(ids) and \
                    positions[j + most] == positions[j] + most:
                most += 1
            lengths = list(range(most, 0, -1))
        else:
            most = 1
            while j + most < len(ids) and at + most < min(end, len(stream)) and \
                    stream[at + most] == ids[j + most]:
                most += 1
            lengths = list(range(most, 0, -1))
        for length in lengths:
            moved = positions is not None and \
                list(positions[j:j + length]) != list(range(at, at + length))
            # where the positions run on past a run of its prompt, it is cut short of them
            # (after a decode token, they may be the next sequence's)
            cut_short = at < end and positions is not None and j + length < len(ids) and \
                positions[j + length] == positions[j + length - 1] + 1
            # a start past a cache or fed again costs what moved positions cost: a sequence
            # going on where it was wins a tie (the same ids fed to two sequences)
            drafts = length - 1 if at >= end else 0
            out.append((length, at, _OFF * (moved or cut_short or at != done[i]) +
                        _DRAFT * drafts, drafts))
    return sorted(out, key=lambda cut: cut[2])  # stable: the cheapest, then the longest


def _cover(req: BatchRequest, done: list[int], ids: Sequence[int],
           positions: Sequence[int] | None, running: set[int]) -> list[_Cut] | None:
    """The flat tokens of one step cut into one segment per sequence: the cheapest cover
    (the fewest segments the positions speak against, then the fewest drafts), or,
    where no cover takes every token, the one that leaves the fewest at the end to no
    sequence; None where not even the first token is any sequence's. Sequences running are
    tried first, in order."""
    best: list[_Cut] | None = None
    best_cost = _TAIL * (len(ids) + 1)
    tries = 0

    def walk(j: int, used: set[int], cuts: list[_Cut], cost: int) -> bool:
        nonlocal best, best_cost, tries
        tries += 1
        if cost >= best_cost or tries > _BUDGET:
            return tries > _BUDGET
        if j == len(ids):
            best, best_cost = list(cuts), cost
            return cost == 0  # nothing better than a cover whose positions all agree
        order = sorted(running - used) + sorted(set(range(len(req.prompts))) - running - used)
        for i in order:
            for length, at, price, drafts in _runs(req, done, ids, positions, j, i):
                cuts.append(_Cut(i, j, length, at, drafts))
                if walk(j + length, used | {i}, cuts, cost + price):
                    return True
                cuts.pop()
        tail = cost + _TAIL * (len(ids) - j)  # the rest is padding: the less the better
        if cuts and tail < best_cost:
            best, best_cost = list(cuts), tail
        return False

    walk(0, set(), [], 0)
    return best


def infer_layout(dump: Any, req: BatchRequest) -> BatchLayout:
    """The packed layout of ``dump``'s steps, found from each step's fed ``input_ids`` (and
    ``positions``) and what lockstep asked for; a step that no sequence could have been fed
    is a ``UsageError`` that names its first stray token."""
    fed = fed_per_step(dump)
    done = [0] * len(req.prompts)  # tokens of each sequence fed so far
    joined: list[int | None] = [None] * len(req.prompts)
    steps = []
    for t, (ids, positions) in sorted(fed.items()):
        if ids is None:
            raise UsageError(f"batch step {t} has no input_ids record: lockstep cannot tell "
                             "whose tokens the packed batch holds (probe the step's "
                             "input_ids and positions, or write the batch layout: "
                             "docs/batching.md)")
        if positions is not None and len(positions) != len(ids):
            positions = None
        running = {i for i, s in enumerate(joined) if s is not None}
        cuts = _cover(req, done, ids, positions, running)
        covered = sum(c.length for c in cuts or ())
        left_out = [i for i in running if done[i] < len(req.stream(i))
                    and i not in {c.sequence for c in cuts or ()}]
        if cuts is None or (covered < len(ids) and left_out and
                            not _graph_padded(covered, len(ids))):
            raise UsageError(_stray(req, done, ids, positions, t))
        segs = []
        for row, cut in enumerate(cuts):
            at = cut.at
            moved = () if positions is None else \
                tuple(int(p) - q for p, q in zip(positions[cut.start:cut.start + cut.length],
                                                  range(at, at + cut.length)))
            stream = req.stream(cut.sequence)
            kept = 0  # drafts kept: those that are the sequence's next tokens
            while kept < cut.drafts and at + 1 + kept < len(stream) and \
                    stream[at + 1 + kept] == ids[cut.start + 1 + kept]:
                kept += 1
            seg = Segment(cut.sequence, row, cut.start, cut.length,
                          moved=moved if any(moved) else (), position=at,
                          drafts=cut.drafts, rejected=cut.drafts - kept)
            segs.append(seg)
            done[cut.sequence] = at + seg.kept
            if joined[cut.sequence] is None:
                joined[cut.sequence] = t
        steps.append(StepLayout(t, True, len(ids), tuple(segs)))
    missing = [i for i, s in enumerate(joined) if s is None]
    if missing:
        raise UsageError(f"sequence {missing[0]}'s tokens are in no step of the batch: the "
                         "engine did not run its prompt")
    return BatchLayout(None, req.prompts, tuple(int(s or 0) for s in joined), tuple(steps),
                       req.chosen)


def _graph_padded(covered: int, width: int) -> bool:
    """Whether ``width - covered`` tokens at the end of a step are a captured CUDA graph's
    padding whatever sequences sat the step out (a preempted one): the width is the next
    size such graphs are captured at after the tokens the sequences fed (vLLM's 1, 2, 4, 8,
    16, 24, ...; SGLang's 1, 2, 4, 8, 12, 16, 24, ...). Otherwise the tokens are padding only
    while every sequence that runs and has tokens to be fed is in the step: else they are a
    token fed in a sequence's place."""
    if covered <= 4:
        return width == next(c for c in (1, 2, 4) if c >= covered)
    eights = -(-covered // 8) * 8
    return width == eights or (covered <= 12 and width == 12)


def _stray(req: BatchRequest, done: list[int], ids: Sequence[int],
           positions: Sequence[int] | None, step: int) -> str:
    """The message for a step whose tokens no cover explains: its first token that no
    sequence was due to be fed, and what the sequences not placed before it were due."""
    j, placed = 0, set()
    while j < len(ids):
        fits = [(i, n) for i in range(len(req.prompts)) if i not in placed
                for n, _, _, _ in _runs(req, done, ids, positions, j, i)[:1]]
        if not fits:
            break
        placed.add(fits[0][0])
        j += fits[0][1]
    due = ", ".join(f"sequence {i}: {req.stream(i)[done[i]]}" for i in range(len(req.prompts))
                    if done[i] < len(req.stream(i)) and i not in placed)
    at = f" at position {positions[j]}" if positions is not None and j < len(ids) else ""
    token = ids[j] if j < len(ids) else ids[-1]
    return (f"batch step {step}: token {token}{at} (flat index {j} of {len(ids)}) is not the "
            f"next token of any sequence (due: {due or 'none'}): the engine fed a token "
            "lockstep did not give it, so whose token is whose cannot be told")


def check_declared(dump: Any, layout: BatchLayout, req: BatchRequest | None) -> None:
    """A ``UsageError`` where the engine's declared layout puts a token in a sequence that
    was not fed it (the step's recorded ``input_ids`` against the sequence's tokens)."""
    if req is None:
        return
    fed = fed_per_step(dump)
    done = [0] * len(req.prompts)
    for st in layout.steps:
        ids = fed.get(st.step, (None, None))[0]
        for seg in st.segments:
            want = req.stream(seg.sequence)[done[seg.sequence]:done[seg.sequence] + seg.length]
            done[seg.sequence] += seg.length
            if ids is None or len(ids) != _flat_width(st):
                continue
            got = tuple(ids[_flat_start(st, seg):_flat_start(st, seg) + seg.length])
            if got != want:
                raise UsageError(
                    f"the dump's batch layout says step {st.step}'s row {seg.row} is sequence "
                    f"{seg.sequence}, whose next tokens are {list(want)[:8]}, but that row was "
                    f"fed {list(got)[:8]}: the layout the engine wrote is not the batch it ran")


def _flat_width(st: StepLayout) -> int:
    return st.width if st.packed else st.width * len(st.segments)


def _flat_start(st: StepLayout, seg: Segment) -> int:
    return seg.start if st.packed else seg.row * st.width + seg.start
