"""Which candidate step is which reference step: matched by what each was fed (its token ids,
and its positions to choose between equal ids), not by call count.

An engine may run a warm-up forward first, record one step more or fewer, or be recorded by a
loop that started late; counting calls then compares the wrong steps. Each step's fed ids come
from its integer ``input_ids`` record (or ``tokens``, ``token_ids``, ``ids``, ``inp_tokens``),
its positions from ``positions``/``position_ids``/``pos``/``inp_pos``. A step is known by its
history: its ids with every id fed before it in the same sequence (a decode step attends to
all of them; a sequence starts at position 0, or where no positions are recorded, at a step
fed several ids). Reference steps are matched in order to the next candidate step with the
same history, so a candidate fed a wrong token at one decode step is not realigned onto a
later step that happens to be fed the reference's token. That matching is used only when
it pairs more steps fed alike than matching by index does, so a candidate fed the wrong ids at
every step (ids and positions swapped) is still compared step by step, and diverges at its
embedding. Candidate steps that no reference step matches are left out of the comparison and
listed; reference steps with no candidate step stay unpaired (the coverage then says so).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from .kinds import FED_NAMES, Kind

__all__ = ["StepMatch", "fed_per_step", "histories", "match_steps", "restep", "ID_NAMES",
           "POSITION_NAMES", "prompt_length"]

ID_NAMES = FED_NAMES[Kind.INPUT_IDS]
POSITION_NAMES = FED_NAMES[Kind.POSITIONS]
_INT = ("int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64")

Fed = tuple[tuple[int, ...] | None, tuple[int, ...] | None]  # (ids, positions)


@dataclass(frozen=True)
class StepMatch:
    """The step pairing used, and what it left out."""

    method: str  #: "index" (call count) or "fed" (matched by the ids each step was fed)
    pairs: tuple[tuple[int, int], ...]  #: (reference step, candidate step)
    ref_steps: int
    cand_steps: int
    cand_left_out: tuple[int, ...] = ()  #: candidate steps no reference step matched
    ref_unmatched: tuple[int, ...] = ()  #: reference steps with no candidate step
    why: str = ""

    @property
    def realigned(self) -> bool:
        """Some candidate step is compared as another reference step, or left out."""
        return bool(self.cand_left_out) or any(r != c for r, c in self.pairs)

    @property
    def noteworthy(self) -> bool:
        """Worth a line in the report: realigned, or step counts that differ."""
        return self.realigned or self.ref_steps != self.cand_steps

    def to_json(self) -> dict[str, Any]:
        return {"method": self.method, "reference_steps": self.ref_steps,
                "candidate_steps": self.cand_steps,
                "pairs": [{"reference": r, "candidate": c} for r, c in self.pairs],
                "candidate_left_out": list(self.cand_left_out),
                "reference_unmatched": list(self.ref_unmatched), "why": self.why,
                "line": self.describe() if self.noteworthy else None}

    def describe(self) -> str:
        """One line for the terminal."""
        counts = f"the reference has {self.ref_steps} steps, the candidate {self.cand_steps}"
        if not self.realigned:
            return f"steps: {counts}; matched by index ({self.why})"
        moved = ", ".join(f"{c}->{r}" for r, c in self.pairs if r != c)
        parts = [f"steps: {counts}; matched by the ids each was fed"]
        if moved:
            parts.append(f"candidate step -> reference step {moved}")
        if self.cand_left_out:
            parts.append("candidate steps left out (fed ids the reference never was): "
                         + ", ".join(map(str, self.cand_left_out)))
        if self.ref_unmatched:
            parts.append("reference steps with no candidate step: "
                         + ", ".join(map(str, self.ref_unmatched)))
        return "; ".join(parts)


def _ints(dump: Any, rec: Any) -> tuple[int, ...] | None:
    if rec is None or not rec.has_data or rec.dtype not in _INT:
        return None
    try:
        return tuple(int(v) for v in np.asarray(dump.read(rec)).reshape(-1))
    except Exception:  # an unreadable record tells nothing about the step
        return None


def _find(records: list[Any], names: tuple[str, ...]) -> Any:
    for r in records:
        if (r.name in names or r.name.rsplit(".", 1)[-1] in names) and r.dtype in _INT:
            return r
    return None


def prompt_length(meta: Any) -> int | None:
    """The tokens of the prompt, from a run's ``prompt_token_ids`` metadata (None: not
    given): the position of the first generated token."""
    ids = meta.get("prompt_token_ids")
    return len(ids) if isinstance(ids, list) and ids else None


def fed_per_step(dump: Any) -> dict[int, Fed]:
    """Each step's fed ids and positions (None where the dump has no such record). Fed ids
    under a name of the engine's own are found by their values (``_ids_by_value``)."""
    by_step: dict[int, list[Any]] = {}
    for r in dump.records:
        by_step.setdefault(r.step, []).append(r)
    names = ID_NAMES
    if by_step and not any(_find(rs, ID_NAMES) for rs in by_step.values()):
        names = _ids_by_value(dump, by_step[min(by_step)]) or names
    return {s: (_ints(dump, _find(rs, names)), _ints(dump, _find(rs, POSITION_NAMES)))
            for s, rs in sorted(by_step.items())}


def _ids_by_value(dump: Any, first: list[Any]) -> tuple[str, ...] | None:
    """The name of the record of integers that holds the first step's fed ids, where the
    engine names it its own way (``tok_ids``): in the first step, the prompt's tokens or a
    run of at least two of them (a prefill after a cached prefix, a first chunk)."""
    prompt = dump.meta.get("prompt_token_ids")
    if not isinstance(prompt, list) or not prompt:
        return None
    text = "," + ",".join(map(str, prompt)) + ","
    for r in first:
        if r.dtype not in _INT or not r.has_data or r.numel > len(prompt) or \
                sum(d > 1 for d in r.shape) > 1:
            continue
        values = _ints(dump, r)
        if values and (len(values) >= 2 or len(prompt) == 1) and \
                "," + ",".join(map(str, values)) + "," in text:
            return (r.name,)
    return None


def histories(fed: dict[int, Fed],
              continues: frozenset[int] = frozenset()) -> dict[int, tuple[int, ...] | None]:
    """Each step's ids with those fed before it in the same sequence: a decode step is known
    by everything it attends to, not by its one token. A sequence starts at position 0 (or,
    with no positions recorded, at a step fed several ids: a prefill, unless the step is in
    ``continues``: decode steps joined into one, align.chunks)."""
    out: dict[int, tuple[int, ...] | None] = {}
    history: tuple[int, ...] = ()
    for step, (ids, pos) in fed.items():
        if ids is None:
            out[step] = None
            history = ()
            continue
        starts = pos[0] == 0 if pos else ((len(ids) > 1 and step not in continues)
                                          or not history)
        history = ids if starts else history + ids
        out[step] = history
    return out


def _index(ref: dict[int, Fed], cand: dict[int, Fed], why: str) -> StepMatch:
    pairs = tuple((s, s) for s in ref if s in cand)
    return StepMatch("index", pairs, len(ref), len(cand),
                     ref_unmatched=tuple(s for s in ref if s not in cand), why=why)


def match_steps(ref: Any, cand: Any) -> StepMatch:
    """Pair the steps of two dumps (see the module docstring)."""
    ref_fed, cand_fed = fed_per_step(ref), fed_per_step(cand)
    if not ref_fed or not cand_fed:
        return _index(ref_fed, cand_fed, "a dump has no steps")
    if any(ids is None for ids, _ in ref_fed.values()) or \
            any(ids is None for ids, _ in cand_fed.values()):
        return _index(ref_fed, cand_fed, "a dump records no fed ids for some step")
    ref_hist = histories(ref_fed, getattr(ref, "continues", frozenset()))
    cand_hist = histories(cand_fed, getattr(cand, "continues", frozenset()))
    alike_by_index = sum(1 for s in ref_fed if s in cand_fed and ref_hist[s] == cand_hist[s])
    cand_order = list(cand_fed)
    pairs: list[tuple[int, int]] = []
    unmatched: list[int] = []
    j = 0
    for s, (_, pos) in ref_fed.items():
        same = [k for k in range(j, len(cand_order)) if cand_hist[cand_order[k]] == ref_hist[s]]
        if not same:
            unmatched.append(s)
            continue
        # equal ids fed twice (a warm-up with the prompt): the one fed the same positions
        k = next((k for k in same if pos is not None and cand_fed[cand_order[k]][1] == pos),
                 same[0])
        pairs.append((s, cand_order[k]))
        j = k + 1
    if len(pairs) <= alike_by_index:
        why = "each step was fed the same ids" if alike_by_index == len(ref_fed) == len(
            cand_fed) else "matching by fed ids pairs no more steps"
        return _index(ref_fed, cand_fed, why)
    used = {c for _, c in pairs}
    return StepMatch("fed", tuple(pairs), len(ref_fed), len(cand_fed),
                     cand_left_out=tuple(c for c in cand_order if c not in used),
                     ref_unmatched=tuple(unmatched),
                     why=f"{len(pairs)} steps fed alike, {alike_by_index} by index")


def restep(dump: Any, match: StepMatch) -> Any:
    """A view of the candidate dump with its steps renumbered as the reference steps they
    match, the steps left out dropped. It shares the dump's mapping: close the dump, not the
    view."""
    if not match.realigned:
        return dump
    to_ref = {c: r for r, c in match.pairs}
    view = copy.copy(dump)
    view.records = [replace(r, step=to_ref[r.step]) for r in dump.records if r.step in to_ref]
    view._by_key = {r.key: r for r in view.records}
    view.close = lambda: None  # the dump it views owns the mapping
    return view
