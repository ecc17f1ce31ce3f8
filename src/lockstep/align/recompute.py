"""A sequence computed again: a serving engine that took a running sequence's KV-cache
blocks back (vLLM's recompute preemption, the default when blocks run out) feeds it every
token again later, its prompt and the decode tokens it had, as one prefill, and goes on
decoding. The rows of that step for tokens the sequence had been fed before are a second
computation of them: the step is cut to its new tokens, so it is compared as the decode step
the other side ran for them (and the steps before it, as they were first computed).

Read from the dump alone, by positions: the step's positions run on one by one from below
the last position fed before, past it, and every token it feeds again is the token fed at
that position before. A prefill run twice (a warm-up) feeds nothing new and is left as it
is. A record of such a step with no dim of the tokens it fed (the last position's logits, the
token sampled) is the last token's, a new one: it is kept whole.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..store.reader import Dump
from .cuts import cut_steps, not_cut_dicts, not_cut_lines
from .steps import fed_per_step

__all__ = ["RecomputeCut", "cut_recomputes"]


@dataclass(frozen=True)
class RecomputeCut:
    """A step that fed its sequence's tokens again, cut to the ones it fed for the first
    time."""

    side: str  #: "reference" or "candidate"
    step: int
    fed: int  #: tokens the step fed
    again: int  #: of them, tokens fed before at the same positions (not compared again)
    left_out: tuple[tuple[str, str], ...] = ()  #: (name, why) of records not cut

    def lines(self) -> list[str]:
        out = [f"the {self.side}'s step {self.step} fed {self.fed} tokens, {self.again} of "
               f"them fed before at the same positions (the sequence computed again after "
               f"its KV cache was taken back: a preemption): compared from token "
               f"{self.again} on, as the step that computes the rest"]
        out += not_cut_lines(self.left_out, self.step)
        return out

    def as_dict(self) -> dict[str, Any]:
        return {"side": self.side, "step": self.step, "fed": self.fed, "again": self.again,
                "left_out": not_cut_dicts(self.left_out)}


def cut_recomputes(dump: Dump, side: str) -> tuple[Dump, tuple[RecomputeCut, ...]]:
    """``dump`` with each step that fed its sequence's tokens again cut to the new ones
    (module doc); the dump itself when there is none. The view shares the dump's mapping:
    close the dump."""
    seen: dict[int, int] = {}  # position -> the id fed there
    last = -1  # the last position fed so far
    found: list[tuple[int, int, int]] = []  # (step, fed, again)
    for s, (ids, pos) in fed_per_step(dump).items():
        if not ids or not pos or len(pos) != len(ids):
            continue
        again = last + 1 - pos[0]
        if 0 < again < len(ids) and list(pos) == list(range(pos[0], pos[-1] + 1)) \
                and all(seen.get(p) == t for p, t in zip(pos[:again], ids[:again])):
            found.append((s, len(ids), again))
        seen.update(zip(pos, ids))
        last = max(last, *pos)
    if not found:
        return dump, ()
    # what the step keeps ends where it ends: a record with no token dim (the last
    # position's logits, the token sampled) is the last new token's, kept whole
    view, left = cut_steps(dump, {s: (n, k, n) for s, n, k in found}, "recomputed_from")
    return view, tuple(RecomputeCut(side, s, n, k, left[s]) for s, n, k in found)
