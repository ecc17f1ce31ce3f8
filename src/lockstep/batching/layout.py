"""The layout of a batched dump, read from its ``batch`` metadata (docs/batching.md).

Per step: ``rows``, the sequence each row (or packed segment) is; then either the padded
layout, ``width`` and per row ``start`` and ``length`` (its real columns), or the packed
layout, ``cu_seqlens`` (in the metadata, or recorded in the step as a ``cu_seqlens``
record). Optional per row: ``write`` and ``read``, the KV slots its real tokens were written
to and its attention read.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from typing import Any

import numpy as np

from ..errors import UsageError

__all__ = ["Segment", "StepLayout", "BatchLayout", "CU_SEQLENS", "refuse_batch_against_run",
           "layout_notes"]

CU_SEQLENS = "cu_seqlens"  #: the record name of a packed step's sequence boundaries


@dataclass(frozen=True)
class Segment:
    """One sequence's part of one batched step."""

    sequence: int
    row: int  #: its row (padded) or segment (packed) in the step
    start: int  #: its first real column (padded) or token (packed)
    length: int  #: its real tokens in the step
    write: tuple[int, ...] = ()
    read: tuple[int, ...] = ()
    #: where the engine fed positions other than the tokens' own: each token's offset
    moved: tuple[int, ...] = ()
    #: the position of its first token in its sequence (None: right after its last step's)
    position: int | None = None
    drafts: int = 0  #: draft tokens fed after its decode token (speculative decoding)
    rejected: int = 0  #: of those, the last ones the sequence did not keep

    @property
    def kept(self) -> int:
        """Its tokens the sequence kept: all but the drafts it rejected (fed again later)."""
        return self.length - self.rejected

    @property
    def samples(self) -> int:
        """Its rows of a record with one row per sequence (the logits): its last token's,
        or each token's of a decode token verifying drafts."""
        return 1 + self.drafts


@dataclass(frozen=True)
class StepLayout:
    """One batched step: the rows and where each sequence's tokens are."""

    step: int
    packed: bool
    width: int  #: padded: the columns of a row; packed: the tokens of the step
    segments: tuple[Segment, ...]

    @property
    def widest(self) -> int:
        """The sequence with the most tokens in the step (the one the others are padded to)."""
        return max(self.segments, key=lambda s: s.length).sequence

    @property
    def padding_after(self) -> int:
        """Packed: the tokens at the end that are no sequence's (a CUDA graph's padding)."""
        if not self.packed or not self.segments:
            return 0
        return self.width - max(s.start + s.length for s in self.segments)

    def piece(self, array: np.ndarray, seg: Segment) -> np.ndarray | None:
        """``seg``'s part of a record of this step, batch dim kept (None: the record is not
        laid out by the batch: one shared value, copied whole)."""
        if self.packed:
            if array.ndim >= 1 and array.shape[0] == self.width:
                return array[seg.start:seg.start + seg.length]
            if array.ndim >= 2 and array.shape[0] == 1 and array.shape[1] == self.width:
                return array[:, seg.start:seg.start + seg.length]
            sampled = [s.samples for s in self.segments]
            if array.ndim >= 1 and array.shape[0] == sum(sampled):  # logits: a row per
                first = sum(sampled[:seg.row])  # sequence, or per token verifying drafts
                return array[first:first + seg.samples]
            return None
        rows = len(self.segments)
        if array.ndim == 0 or array.shape[0] != rows:
            return None
        if array.ndim >= 2 and array.shape[1] == self.width:
            return array[seg.row:seg.row + 1, seg.start:seg.start + seg.length]
        return array[seg.row:seg.row + 1]


def _ints(value: Any, what: str) -> list[int]:
    if not isinstance(value, list) or not all(isinstance(v, int) for v in value):
        raise UsageError(f"the dump's batch metadata: {what} is not a list of integers")
    return [int(v) for v in value]


@dataclass(frozen=True)
class BatchLayout:
    """Every step of a batched dump, and its prompts."""

    padding: str | None  #: "left", "right", or None (packed)
    prompts: tuple[tuple[int, ...], ...]
    join_at: tuple[int, ...]
    steps: tuple[StepLayout, ...]
    tokens: tuple[tuple[int, ...], ...]  #: each sequence's chosen tokens, where recorded

    @classmethod
    def from_meta(cls, meta: dict[str, Any],
                  cu_records: dict[int, list[int]] | None = None) -> BatchLayout:
        """The layout of a dump's ``batch`` metadata; ``cu_records``: the ``cu_seqlens``
        recorded per step, for packed steps whose metadata does not hold them."""
        info = meta.get("batch")
        if not isinstance(info, dict):
            raise UsageError("the dump has no batch metadata: it was not recorded as a batch")
        prompts = [tuple(_ints(p, "a prompt")) for p in info.get("prompts") or []]
        if not prompts:
            raise UsageError("the dump's batch metadata names no prompts")
        steps = []
        for t, st in enumerate(info.get("steps") or []):
            rows = _ints(st.get("rows"), f"step {t}'s rows")
            writes, reads = st.get("write") or [()] * len(rows), st.get("read") or [()] * len(rows)
            cu = st.get(CU_SEQLENS) or (cu_records or {}).get(t)
            if cu is not None:
                cu = _ints(list(cu), f"step {t}'s cu_seqlens")
                if len(cu) != len(rows) + 1:
                    raise UsageError(f"step {t}: {len(cu)} cu_seqlens for {len(rows)} rows")
                segs = tuple(Segment(i, b, cu[b], cu[b + 1] - cu[b], tuple(writes[b]),
                                     tuple(reads[b])) for b, i in enumerate(rows))
                steps.append(StepLayout(t, True, cu[-1], segs))
                continue
            starts, lengths = _ints(st.get("start"), "start"), _ints(st.get("length"), "length")
            width = int(st.get("width", 0))
            if not len(starts) == len(lengths) == len(rows) or \
                    any(s < 0 or s + n > width for s, n in zip(starts, lengths)):
                raise UsageError(f"step {t} of the dump's batch metadata: rows, start, length "
                                 "and width do not fit together")
            segs = tuple(Segment(i, b, s, n, tuple(writes[b]), tuple(reads[b]))
                         for b, (i, s, n) in enumerate(zip(rows, starts, lengths)))
            steps.append(StepLayout(t, False, width, segs))
        joins = info.get("join_at") or [0] * len(prompts)
        tokens = info.get("generated_token_ids") or []
        return cls(info.get("padding"), tuple(prompts), tuple(_ints(joins, "join_at")),
                   tuple(steps), tuple(tuple(t) for t in tokens))

    @cached_property
    def _by_sequence(self) -> dict[int, list[tuple[StepLayout, Segment]]]:
        out: dict[int, list[tuple[StepLayout, Segment]]] = {}
        for st in self.steps:
            for seg in st.segments:
                out.setdefault(seg.sequence, []).append((st, seg))
        return out

    def of(self, sequence: int) -> list[tuple[StepLayout, Segment]]:
        """The steps ``sequence`` ran in, with its segment of each, in order."""
        return list(self._by_sequence.get(sequence, ()))

    def positions(self, sequence: int) -> list[tuple[StepLayout, Segment, int]]:
        """``of(sequence)`` with the position of each segment's first token in its sequence
        (right after the last segment's tokens kept, unless the segment says where: past a
        cached prefix, or fed again)."""
        out, done = [], 0
        for st, seg in self.of(sequence):
            at = done if seg.position is None else seg.position
            out.append((st, seg, at))
            done = at + seg.kept
        return out


def _batch_size(meta: Any) -> int | None:
    """The prompts of a dump that records one batched run of several (None: not one)."""
    for key in ("batch_request", "batch"):
        info = meta.get(key)
        if isinstance(info, dict) and isinstance(info.get("prompts"), list):
            return len(info["prompts"])
    return None


def refuse_batch_against_run(ref: Any, cand: Any) -> None:
    """A ``UsageError`` where one side is a whole batch and the other one run: its rows are
    several sequences', and only a sequence split out of it is comparable."""
    sizes = {side: _batch_size(d.meta) for side, d in (("reference", ref), ("candidate", cand))}
    for side, dump in (("reference", ref), ("candidate", cand)):
        other = "candidate" if side == "reference" else "reference"
        if sizes[side] and not sizes[other]:
            raise UsageError(f"the {side} {dump.path} is one batched run of {sizes[side]} "
                             f"prompts and the {other} is not: split it into one dump per "
                             f"sequence (lockstep split {dump.path} --out DIR) and compare "
                             "the sequence's dump, or run both with lockstep diff --batch")


def layout_notes(layout: BatchLayout) -> tuple[str, ...]:
    """What the batch did beyond packing or padding its sequences, one sentence each: a
    prefill after a cached prefix, a sequence fed its tokens again, steps padded past their
    sequences' tokens, positions that are not the tokens' own."""
    notes: list[str] = []
    for i in range(len(layout.prompts)):
        done = 0
        for st, seg, at in layout.positions(i):
            if at and not done:
                notes.append(f"sequence {i}'s prefill starts at token {at}: the tokens before "
                             "came from the engine's prefix cache")
            elif at < done:
                notes.append(f"sequence {i} was fed its tokens again from token {at} at "
                             f"batch step {st.step} (preempted and computed again)")
            done = at + seg.kept
        drafted = [seg for _, seg in layout.of(i) if seg.drafts]
        if drafted:
            fed = sum(seg.drafts for seg in drafted)
            kept = fed - sum(seg.rejected for seg in drafted)
            notes.append(f"sequence {i} verified speculative drafts at {len(drafted)} batch "
                         f"steps: {kept} of {fed} kept")
        moved = [st.step for st, seg in layout.of(i) if seg.moved]
        if moved:
            notes.append(f"sequence {i}'s positions are not its tokens' own at batch steps "
                         f"{moved[:8]}{' ...' if len(moved) > 8 else ''}")
    padded = [st.step for st in layout.steps if st.padding_after]
    if padded:
        notes.append(f"batch steps {padded[:8]}{' ...' if len(padded) > 8 else ''} hold tokens "
                     "past their sequences' (a CUDA graph's padding), compared with none")
    return tuple(notes)
