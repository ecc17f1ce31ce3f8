"""Speculative decoding: a decode step that fed the last token and draft tokens in one
forward (vLLM's and SGLang's speculative decoding verify k drafts at once) and kept the first
few. The rows of the drafts it rejected hold tokens the sequence never had: they are cut off
the step before the steps are matched, so what is left is compared with the other side's
steps for the same tokens (one step each there: align.chunks joins them). A record of such a
step with no dim of the tokens it fed (the last row alone, a cache read back with the
drafts in it) is left out: the comparison is then incomplete, never a match.

Which drafts were rejected is read from the dump alone, by positions: the next step of the
same sequence starts at a position inside this step (the rejected positions are fed again,
with the token the engine chose there); for the run's last step, its ``generated_token_ids``
end before them. A step whose positions are not recorded is left as it is.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..store.reader import Dump
from .cuts import cut_steps, not_cut_dicts, not_cut_lines
from .steps import fed_per_step, histories, prompt_length

__all__ = ["DraftCut", "cut_drafts"]

_NO_TOKEN_DIM = ("it has no dim of the tokens the step fed, so its rows of the rejected drafts "
                 "cannot be cut off (the last row alone is a rejected draft's)")


@dataclass(frozen=True)
class DraftCut:
    """A decode step's rows of rejected drafts cut off."""

    side: str  #: "reference" or "candidate"
    step: int
    fed: int  #: tokens the step fed: the last token and its drafts
    kept: int  #: the tokens compared: the first, and the drafts kept
    left_out: tuple[tuple[str, str], ...] = ()  #: (name, why) of records not cut

    def lines(self) -> list[str]:
        drafts = self.fed - self.kept
        rows = "the row of its rejected draft is" if drafts == 1 else \
            f"the rows of its {drafts} rejected drafts are"
        out = [f"the {self.side}'s step {self.step} fed {self.fed} tokens (speculative "
               f"decoding: its last token and {self.fed - 1} drafts) and kept {self.kept}: "
               f"{rows} not compared"]
        out += not_cut_lines(self.left_out, self.step)
        return out

    def as_dict(self) -> dict[str, Any]:
        return {"side": self.side, "step": self.step, "fed": self.fed, "kept": self.kept,
                "left_out": not_cut_dicts(self.left_out)}


def _generated(dump: Dump) -> int | None:
    ids = dump.meta.get("generated_token_ids")
    return len(ids) if isinstance(ids, list) else None


def cut_drafts(dump: Dump, side: str) -> tuple[Dump, tuple[DraftCut, ...]]:
    """``dump`` with each decode step's rows of rejected drafts cut off (module doc); the
    dump itself when there are none. The view shares the dump's mapping: close the dump."""
    fed = fed_per_step(dump)
    hist = histories(fed)
    steps = list(fed)
    prompt, generated = prompt_length(dump.meta), _generated(dump)
    found: list[tuple[int, int, int]] = []  # (step, fed, kept)
    for i, s in enumerate(steps):
        ids, pos = fed[s]
        h = hist[s]
        if not ids or len(ids) < 2 or not pos or h is None or len(h) == len(ids):
            continue  # one token, no positions, or a sequence's first step (a prefill)
        end = None
        if i + 1 < len(steps):
            after = fed[steps[i + 1]][1]
            if after and pos[0] < after[0] <= pos[-1]:
                end = after[0]  # the next step feeds again from there: rejected before
        elif prompt is not None and generated:
            end = prompt + generated - 1  # the last token chosen is never fed
        if end is not None and pos[0] < end <= pos[-1]:
            found.append((s, len(ids), end - pos[0]))
    if not found:
        return dump, ()
    view, left = cut_steps(dump, {s: (n, 0, kept) for s, n, kept in found}, "drafts_kept",
                           others=_NO_TOKEN_DIM)
    return view, tuple(DraftCut(side, s, n, kept, left[s]) for s, n, kept in found)
