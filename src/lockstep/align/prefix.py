"""A prefill that began after a cached prefix: one side computed only the tail of the prompt,
its first tokens' keys and values taken from a prefix cache filled before the recording
(vLLM's prefix caching and SGLang's radix cache, both on by default: a prompt run twice is
computed in full only the first time). The other side's step that fed the whole prompt is
compared from the same token on.

The side that starts late is known by what it was fed, never by a count: its first step's
positions start at P > 0, and the other side has a step that fed the same ids from position P
on (and more before them). A first step fed two tokens or more whose positions start at 0
(or are not recorded) but whose ids are the last ones of the other side's prefill is cut the
same way, and said to be
either: a prefix cache whose positions restart (a bug the comparison then finds), or a prompt
cut short. That step's records are cut to the tokens from P on along their
token dim (the dim whose size is the tokens that step was fed); records with no such dim
(the last position's logits, a sampled token) are kept whole, and so is one whose name the
late side records with the same whole shape (keys read back from its cache).
A record that cannot be cut (kept as statistics only) is left out and listed: the
comparison is then incomplete, never a match.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..store.reader import Dump
from .cuts import cut_steps, not_cut_dicts, not_cut_lines
from .steps import Fed, fed_per_step, histories

__all__ = ["PrefixCut", "cut_prefixes"]


@dataclass(frozen=True)
class PrefixCut:
    """One side's step compared from token ``start`` on: the other side took the tokens
    before it from its prefix cache."""

    side: str  #: the side whose step was cut: "reference" or "candidate"
    step: int
    tokens: int  #: the tokens that step was fed
    start: int  #: the tokens left out: the other side's cached prefix
    other_step: int  #: the other side's first step, which starts at position ``start``
    left_out: tuple[tuple[str, str], ...] = ()  #: (name, why) of records not cut
    how: str = "positions"  #: "positions": the other side's positions start at ``start``;
    #: "ids": they start at 0 (or none are recorded), its ids are the last ``tokens - start``

    @property
    def other(self) -> str:
        return "candidate" if self.side == "reference" else "reference"

    def lines(self) -> list[str]:
        cached = "token 0" if self.start == 1 else f"tokens 0-{self.start - 1}"
        compared = (f"the {self.side}'s step {self.step} is compared from token {self.start} "
                    f"on ({self.tokens - self.start} of its {self.tokens} tokens)")
        if self.how == "positions":
            first = (f"the {self.other}'s step {self.other_step} starts at position "
                     f"{self.start}: {cached} came from its prefix cache (computed before "
                     "the recording, not compared)")
        else:
            first = (f"the {self.other}'s step {self.other_step} was fed the last "
                     f"{self.tokens - self.start} of the {self.side}'s {self.tokens} tokens "
                     f"alone, its positions not starting at {self.start}: {cached} came "
                     "from a prefix cache, or were cut off the prompt")
        out = [f"{first}; {compared}"]
        out += not_cut_lines(self.left_out, self.step)
        return out

    def as_dict(self) -> dict[str, Any]:
        return {"side": self.side, "step": self.step, "tokens": self.tokens,
                "start": self.start, "other_step": self.other_step, "how": self.how,
                "left_out": not_cut_dicts(self.left_out)}


def _first_position(fed: dict[int, Fed], hist: dict[int, tuple[int, ...] | None],
                    step: int) -> int | None:
    """Where ``step``'s first token sits: its recorded position, else its place in the
    sequence's history."""
    ids, pos = fed[step]
    if pos:
        return pos[0]
    h = hist[step]
    return len(h) - len(ids) if h is not None and ids is not None else None


def _found(late: dict[int, Fed], full: dict[int, Fed]) -> tuple[int, int, int, str] | None:
    """(the late side's first step, the full side's step, P, how) when the late side's first
    step starts at position P > 0 and the full side fed the same ids from P on (how:
    "positions"); or, its positions not saying so, when its ids are the last ones of a
    step of the full side that fed more (how: "ids")."""
    if not late:
        return None
    first = next(iter(late))
    ids, pos = late[first]
    if not ids:
        return None
    hist = histories(full)
    if pos and pos[0] > 0:
        for u, (u_ids, _) in full.items():
            p0 = _first_position(full, hist, u) if u_ids else None
            if u_ids is None or p0 is None:
                continue
            k = pos[0] - p0
            if 0 < k < len(u_ids) and u_ids[k:k + len(ids)] == ids:
                return first, u, k, "positions"
        return None
    # positions from 0 (or none): the tail of the prompt alone, at positions that restart
    # (one token is too little to tell a tail by: a decode step could be fed the same id)
    if len(ids) < 2:
        return None
    for u, (u_ids, _) in full.items():
        if u_ids is not None and len(ids) < len(u_ids) and u_ids[len(u_ids) - len(ids):] == \
                ids and u_ids[:len(ids)] != ids:
            return first, u, len(u_ids) - len(ids), "ids"
        if u_ids is not None and len(u_ids) > 1:  # only the first prefill is looked at
            return None
    return None


def cut_prefixes(ref: Dump, cand: Dump) -> tuple[Dump, Dump, tuple[PrefixCut, ...]]:
    """Both sides, the full side's step cut where the other began after a cached prefix
    (module doc); a side with nothing to cut is returned as it is. The views share their
    dump's mapping: close the dumps, not them."""
    sides = {"reference": ref, "candidate": cand}
    fed = {side: fed_per_step(d) for side, d in sides.items()}
    for full, late in (("reference", "candidate"), ("candidate", "reference")):
        found = _found(fed[late], fed[full])
        if found is None:
            continue
        first, u, k, how = found
        late_shapes = {r.name: r.shape for r in sides[late].records if r.step == first}
        n = len(fed[full][u][0] or ())
        sides[full], left = cut_steps(sides[full], {u: (n, k, n)}, "from_token", late_shapes)
        cut = PrefixCut(full, u, n, k, first, left[u], how)
        return sides["reference"], sides["candidate"], (cut,)
    return ref, cand, ()
