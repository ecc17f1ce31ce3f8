"""Coverage: whether a comparison compared what decides it.

A debugger must not say "match" when it could not tell. These records are *decisive*; when one
of them is left unpaired, or paired but incomparable, the verdict is ``incomplete`` instead of
``match`` or ``drift`` (a divergence that was found still wins):

- the logits, at every step the reference records them (and a candidate's logits record that
  nothing paired, at a step where no logits were compared);
- the final norm, at every step the reference records it;
- every layer of the reference at every step: a layer none of whose records was compared;
- more than ``LAYER_SHARE`` (20%) of the reference's layer records (of all its records when
  no name carries a layer index) that the candidate could pair: a record no unpaired
  candidate record of its element count at its step could pair with (llama.cpp's attention
  scores, KV cache views or the steps inside an op, when it is the reference, beside a
  candidate whose records were all paired) is not counted, and the report says how many;
- every rank of a dump that records ranks (docs/format.md): a rank none of whose records was
  compared (a tensor-parallel shard left out).

Records only the candidate has (llama.cpp's extra graph nodes, views of its KV cache) are
never a reason, but for its logits. For each gap the report names what went uncompared, the
closest unpaired candidate records (by name and shape), and mapping-file rules
(docs/mapping.md) that would pair them.
"""

from __future__ import annotations

from dataclasses import dataclass
from difflib import SequenceMatcher
from typing import Any, Iterable, Mapping, Sequence

from ..align.kinds import Kind as K
from ..align.layouts import layout_candidates, squeeze_shape
from ..align.mapping_writer import rules_text
from ..align.roles import Role, role_of_name
from ..store.reader import Record
from .case import is_logits

__all__ = ["Coverage", "Count", "Gap", "Closest", "coverage_of", "LAYER_SHARE", "steps_text"]

#: more than this share of the reference's layer records left uncompared: incomplete
LAYER_SHARE = 0.2
_SHOWN = 6  #: uncompared records named (and given a rule) per gap
_CLOSEST = 3  #: closest candidate records named per gap

PAIRED, INCOMPARABLE, UNPAIRED = "paired", "incomparable", "unpaired"


@dataclass(frozen=True)
class Count:
    """Records of one step, layer or rank: compared, with no partner, or paired but never
    measurable."""

    key: int
    paired: int
    unpaired: int
    incomparable: int

    def as_dict(self, key: str) -> dict[str, int]:
        return {key: self.key, "paired": self.paired, "unpaired": self.unpaired,
                "incomparable": self.incomparable}


@dataclass(frozen=True)
class Closest:
    """An unpaired candidate record that may be the one a reference record needs."""

    reference: str
    candidate: str
    shape: tuple[int, ...]
    score: float  #: name similarity (0-1), +1 for the same shape, +1 for the same op


@dataclass(frozen=True)
class Gap:
    """A decisive part of the run that was not compared."""

    what: str  #: "logits", "final_norm", "layer", "layers" or "rank"
    reason: str  #: one sentence, with the names and counts
    records: tuple[str, ...] = ()  #: some of the records left uncompared, as ``name@step``
    closest: tuple[Closest, ...] = ()
    rule: str | None = None  #: mapping-file rules that would pair them (TOML)

    def as_dict(self) -> dict[str, Any]:
        return {"what": self.what, "reason": self.reason, "records": list(self.records),
                "closest": [{"reference": c.reference, "candidate": c.candidate,
                             "shape": list(c.shape), "score": round(c.score, 3)}
                            for c in self.closest],
                "rule": self.rule}


@dataclass(frozen=True)
class Coverage:
    """What was compared, per step, layer and rank, and the decisive gaps."""

    steps: tuple[Count, ...]  #: reference records per step
    layers: tuple[Count, ...]  #: reference records per layer (those with a layer index)
    ranks: tuple[tuple[str, Count], ...]  #: ("reference" or "candidate", records per rank)
    candidate_unpaired: tuple[tuple[int, int], ...]  #: (step, candidate records unpaired)
    decisive: tuple[str, ...]  #: what was held decisive and how it fared, in words
    gaps: tuple[Gap, ...]

    @property
    def complete(self) -> bool:
        return not self.gaps

    def as_dict(self) -> dict[str, Any]:
        unpaired = dict(self.candidate_unpaired)
        return {
            "complete": self.complete, "layer_share_limit": LAYER_SHARE,
            "steps": [{**c.as_dict("step"), "candidate_unpaired": unpaired.get(c.key, 0)}
                      for c in self.steps],
            "layers": [c.as_dict("layer") for c in self.layers],
            "ranks": [{"side": side, **c.as_dict("rank")} for side, c in self.ranks],
            "decisive": list(self.decisive),
            "incomplete_because": [g.as_dict() for g in self.gaps],
        }


def at_steps(steps: Iterable[int]) -> str:
    """``at step 2``, ``at steps 0-4``."""
    s = sorted(set(steps))
    return f"at step{'s' if len(s) > 1 else ''} {steps_text(s)}"


def steps_text(steps: Iterable[int]) -> str:
    """``0-4``, ``1, 3`` or ``2``: a list of steps as a person reads it."""
    s = sorted(set(steps))
    if len(s) > 2 and s == list(range(s[0], s[-1] + 1)):
        return f"{s[0]}-{s[-1]}"
    return ", ".join(map(str, s))


def _at(r: Record) -> str:
    return f"{r.name or '(root)'}@{r.step}"


class _Side:
    """One dump's records and what became of each."""

    def __init__(self, meta: Mapping[str, Any]) -> None:
        self.meta = meta
        self.state: dict[int, tuple[Record, str, str | None]] = {}
        self._roles: dict[str, Role] = {}

    def add(self, rec: Record, state: str, note: str | None = None) -> None:
        seen = self.state.get(rec.seq)
        if seen is None or seen[1] != PAIRED:
            self.state[rec.seq] = (rec, state, note)

    def role(self, name: str) -> Role:
        if name not in self._roles:
            self._roles[name] = role_of_name(name)
        return self._roles[name]

    def logits(self, rec: Record) -> bool:
        return is_logits(rec, self.meta) or self.role(rec.name).op == K.LOGITS

    def where(self, pick: Any) -> list[tuple[Record, str, str | None]]:
        return [s for s in self.state.values() if pick(s[0])]


def _count(key: int, states: Sequence[tuple[Record, str, str | None]]) -> Count:
    kinds = [s[1] for s in states]
    return Count(key, kinds.count(PAIRED), kinds.count(UNPAIRED), kinds.count(INCOMPARABLE))


def _grouped(states: Iterable[tuple[Record, str, str | None]],
             key: Any) -> dict[Any, list[tuple[Record, str, str | None]]]:
    out: dict[Any, list[tuple[Record, str, str | None]]] = {}
    for s in states:
        k = key(s[0])
        if k is not None:
            out.setdefault(k, []).append(s)
    return dict(sorted(out.items()))


def _transforms(ref_shape: Sequence[int],
                cand_shape: Sequence[int]) -> tuple[str | None, str | None] | None:
    """(candidate, reference) transforms that make the shapes comparable: a layout, or a
    slice of the one dim the candidate holds more of (a padded vocabulary); None if none."""
    layouts = layout_candidates(ref_shape, cand_shape)
    if layouts:
        return layouts[0].cand_transform, layouts[0].ref_transform
    r, c = squeeze_shape(ref_shape), squeeze_shape(cand_shape)
    wider = [i for i, (a, b) in enumerate(zip(r, c)) if a != b]
    if len(r) == len(c) and len(wider) == 1 and c[wider[0]] > r[wider[0]]:
        dim = wider[0] - len(c)
        return f"squeeze|slice({dim}, 0, {r[wider[0]]})", None
    return None


class _Suggest:
    """The closest unpaired candidate records to uncompared reference records, and rules."""

    def __init__(self, ref: _Side, cand_only: Sequence[Record]) -> None:
        self.ref = ref
        self.by_step: dict[int, list[Record]] = {}
        for c in cand_only:
            self.by_step.setdefault(c.step, []).append(c)

    def _score(self, r: Record, c: Record) -> float:
        score = SequenceMatcher(None, r.name.lower(), c.name.lower()).ratio()
        if squeeze_shape(r.shape) == squeeze_shape(c.shape):
            score += 1.0
        if self.ref.role(r.name).op and self.ref.role(r.name).op == self.ref.role(c.name).op:
            score += 1.0
        return score

    def gap(self, what: str, reason: str,
            missing: Sequence[tuple[Record, str, str | None]]) -> Gap:
        shown: dict[str, tuple[Record, str, str | None]] = {}
        for s in missing:
            shown.setdefault(s[0].name, s)
        picked = list(shown.values())[:_SHOWN]
        records = tuple(_at(r) + (f" (incomparable: {note})" if state == INCOMPARABLE else "")
                        for r, state, note in picked)
        closest: list[Closest] = []
        rules: list[tuple[str, str, str | None, str | None]] = []
        for r, _, _ in picked:
            options = sorted(((self._score(r, c), c) for c in self.by_step.get(r.step, ())),
                             key=lambda x: -x[0])
            for score, c in options[:1]:
                closest.append(Closest(r.name, c.name, c.shape, score))
                fit = _transforms(r.shape, c.shape)
                if fit is not None:
                    rules.append((c.name, r.name, *fit))
        closest.sort(key=lambda x: -x.score)
        rule = rules_text(rules, "suggested by lockstep: check before use") if rules else None
        return Gap(what, reason, records, tuple(closest[:_CLOSEST]), rule)


def coverage_of(pairs: Iterable[tuple[Record, Record, str | None]],
                ref_only: Sequence[Record], cand_only: Sequence[Record],
                ref_meta: Mapping[str, Any], cand_meta: Mapping[str, Any]) -> Coverage:
    """The coverage of a comparison. ``pairs``: (reference record, candidate record, None when
    the pair was measured, else why it is incomparable)."""
    ref, cand = _Side(ref_meta), _Side(cand_meta)
    for r, c, note in pairs:
        ref.add(r, PAIRED if note is None else INCOMPARABLE, note)
        cand.add(c, PAIRED if note is None else INCOMPARABLE, note)
    for r in ref_only:
        ref.add(r, UNPAIRED)
    for c in cand_only:
        cand.add(c, UNPAIRED)
    suggest = _Suggest(ref, cand_only)
    gaps: list[Gap] = []
    decisive: list[str] = []
    everything = list(ref.state.values())
    steps = tuple(_count(k, v) for k, v in _grouped(everything, lambda r: r.step).items())
    layer_of = lambda r: ref.role(r.name).layer  # noqa: E731
    layers = tuple(_count(k, v) for k, v in _grouped(everything, layer_of).items())

    # the logits and the final norm, at each step the reference records them
    for what, words, verb, pick in (("logits", "the logits", "were", ref.logits),
                                    ("final_norm", "the final norm", "was",
                                     lambda r: ref.role(r.name).op == K.FINAL_NORM)):
        by_step = _grouped(ref.where(pick), lambda r: r.step)
        missed = {s: v for s, v in by_step.items() if all(x[1] != PAIRED for x in v)}
        names = sorted({x[0].name for v in by_step.values() for x in v})
        if by_step:
            decisive.append(f"{words} ({', '.join(names)}): compared at "
                            f"{len(by_step) - len(missed)} of {len(by_step)} steps")
        if missed:
            gaps.append(suggest.gap(what, f"{words} ({', '.join(names)}) {verb} not compared "
                                          f"{at_steps(missed)}",
                                    [x for v in missed.values() for x in v]))
    # a candidate's logits at a step where the reference recorded none to compare them with
    ref_logits = {r.step for r, _, _ in ref.where(ref.logits)}
    stray = [s for s in cand.where(cand.logits) if s[1] != PAIRED and s[0].step not in ref_logits]
    if stray:
        names = sorted({s[0].name for s in stray})
        gaps.append(Gap("logits", f"the candidate's logits ({', '.join(names)}) were never "
                                  f"compared ({at_steps(s[0].step for s in stray)})",
                        tuple(_at(s[0]) for s in stray[:_SHOWN])))

    # every layer of the reference, at every step
    layer_states = [s for s in everything if layer_of(s[0]) is not None]
    by_layer_step = _grouped(layer_states, lambda r: (layer_of(r), r.step))
    lost: dict[int, list[int]] = {}
    for (layer, step), v in by_layer_step.items():
        if all(x[1] != PAIRED for x in v):
            lost.setdefault(layer, []).append(step)
    if layers:
        decisive.append(f"every layer at every step: {len(layers)} layers, "
                        f"{len(layers) - len(lost)} compared at every step")
    for layer, at in lost.items():
        missing = [s for s in layer_states if layer_of(s[0]) == layer and s[0].step in at]
        gaps.append(suggest.gap("layer", f"layer {layer} of the reference: none of its "
                                         f"{len(missing)} records was compared "
                                         f"{at_steps(at)}", missing))

    # the share of (layer) records left uncompared, of those the candidate could pair: a
    # record with no unpaired candidate record of its size at its step had nothing to pair
    # with (llama.cpp's attention scores, its KV cache views and the steps inside an op, when
    # it is the reference, beside a candidate whose every record was paired)
    sizes: dict[int, set[int]] = {}
    for rec, state, _ in cand.state.values():
        if state == UNPAIRED:
            sizes.setdefault(rec.step, set()).add(rec.numel)
    whole = layer_states or everything
    pool = [s for s in whole if s[1] != UNPAIRED or s[0].numel in sizes.get(s[0].step, ())]
    left = [s for s in pool if s[1] != PAIRED]
    what = "layer records" if layer_states else "records"
    if pool:
        alone = len(whole) - len(pool)
        decisive.append(f"at most {LAYER_SHARE:.0%} of the reference's {what} uncompared: "
                        f"{len(left)} of {len(pool)}" + (
                            f" ({alone} more have no unpaired candidate record of their size "
                            "at their step to pair with)" if alone else ""))
    if pool and len(left) > LAYER_SHARE * len(pool) and not lost:
        gaps.append(suggest.gap("layers", f"{len(left)} of the reference's {len(pool)} {what} "
                                          f"({len(left) / len(pool):.0%}) were not compared "
                                          f"(at most {LAYER_SHARE:.0%} may be)", left))

    # every rank of a dump that records ranks
    ranks: list[tuple[str, Count]] = []
    for label, side in (("reference", ref), ("candidate", cand)):
        by_rank = _grouped(side.state.values(), lambda r: r.extra.get("rank"))
        for rank, v in by_rank.items():
            count = _count(rank, v)
            ranks.append((label, count))
            if not count.paired:
                gaps.append(Gap("rank", f"rank {rank} of the {label}: none of its {len(v)} "
                                        "records was compared (records pair by name; give "
                                        "each rank's shard a name of its own and map it, or "
                                        "compare one rank at a time)",
                                tuple(_at(s[0]) for s in v[:_SHOWN])))
        if by_rank:
            decisive.append(f"every rank of the {label}: ranks {steps_text(by_rank)}")

    cand_unpaired = _grouped(cand.where(lambda c: True), lambda c: c.step)
    return Coverage(steps, layers, tuple(ranks),
                    tuple((k, sum(s[1] == UNPAIRED for s in v))
                          for k, v in cand_unpaired.items()),
                    tuple(decisive), tuple(gaps))
