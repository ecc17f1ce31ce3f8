"""Every pair checked by its values: a wrong pair is re-paired, not reported as a divergence.

Whatever paired two records (the same name, a name table, structure), their values decide.
A real bug's error propagates: everything computed after it disagrees too. A mispairing's
does not: the records after it agree again. So a pair template (the pair's two names with the
layer index taken out) whose values disagree, at the first step and the first layers, while a
pair later in that step agrees far better, is a suspect. (A real bug can look the same: an
embedding scaled 8x is undone by the next norm, so a suspect needs positive evidence.) Its
alternatives are tried by values: the other records of the candidate's layer (another output
of a tuple, the other part of a fused tensor, what another wrong pair holds), each under the
layouts that fit; one that agrees is kept at every step and layer. Else, when the suspect's
candidate record agrees with a reference record nothing paired, it is let go and paired with
that record; when nothing agrees anywhere, the pair stands. Integer and float records are
never paired with each other.
"""

from __future__ import annotations

import functools
import math
from dataclasses import replace
from typing import Callable, Iterable, Mapping, Sequence

import numpy as np

from ..store.reader import Dump, Record, trimmer
from .layouts import layout_candidates, relative_error, same_kind
from .pairs import Pair
from .structure import layer_of
from .transforms import apply_transform, merged_meta

__all__ = ["check_pairs", "same_kind", "pair_error"]

#: a pair disagreeing above this relative error is a suspect ...
SUSPECT = 0.2
#: ... when a later pair of its step agrees this many times better
RECOVERY = 50.0
#: an alternative must agree this closely (relative L2; bfloat16 noise passes)
AGREE = 0.05
_PROBE_LAYERS = 1  # layers read per template, at the first step

Reader = Callable[[Dump, Record], np.ndarray]
_Key = tuple[str, str, int]  # (reference template, candidate template, layer offset)


def pair_error(ref: Dump, cand: Dump, r: Record, c: Record, ref_transform: str | None,
               cand_transform: str | None, read: Reader) -> float:
    """Relative L2 error of the two records under the transforms (nan: not comparable)."""
    if not (r.has_data and c.has_data) or not same_kind(r, c):
        return math.nan
    try:
        a = apply_transform(ref_transform, read(ref, r), ref.meta)
        b = apply_transform(cand_transform, read(cand, c), merged_meta(ref, cand))
    except Exception:  # a transform that does not fit this pair
        return math.nan
    try:
        return relative_error(a, b, trimmer(ref, cand))
    finally:  # sampled: the pages need not stay in this process (a huge logits tensor)
        ref.release(r)
        cand.release(c)


def _template(rec: Record) -> tuple[int | None, str]:
    return _layer_of(rec.name)


_layer_of = functools.lru_cache(maxsize=65536)(layer_of)


def _key(p: Pair) -> _Key:
    rl, rt = _template(p.ref)
    cl, ct = _template(p.cand)
    return rt, ct, (cl - rl) if rl is not None and cl is not None else 0


def _transforms(pairs: Iterable[Pair], c: Record) -> list[str | None]:
    """Transforms other pairs already apply to ``c`` (the parts of a fused record)."""
    return [p.cand_transform for p in pairs if p.cand.seq == c.seq]


def check_pairs(ref: Dump, cand: Dump, pairs: list, ref_free: list[Record],
                cand_free: list[Record], read: Reader) -> tuple[list, list[Record], list[Record]]:
    """(pairs, unpaired reference records, unpaired candidate records) after checking every
    pair template by its values (see the module docstring). ``pairs`` are ``Pair``s."""
    given = pairs
    pairs = [p for p in given if same_kind(p.ref, p.cand)]
    first = min((p.ref.step for p in pairs), default=0)  # none: an empty side
    groups: dict[_Key, list] = {}
    for p in pairs:
        groups.setdefault(_key(p), []).append(p)
    probes = _probes(groups, first)
    errors = {id(p): pair_error(ref, cand, p.ref, p.cand, p.ref_transform, p.cand_transform,
                                read) for ps in probes.values() for p in ps}
    suspects = _suspects(probes, errors)
    index = _index(cand.records)
    cand_by_step: dict[tuple[int, int | None], list[Record]] = {}
    for c in cand.records:
        cand_by_step.setdefault((c.step, _template(c)[0]), []).append(c)
    out = [p for p in pairs if _key(p) not in suspects]
    for key in suspects:
        probe = probes[key][0]
        found = _alternative(ref, cand, probe, errors[id(probe)], pairs,
                             cand_by_step.get((probe.cand.step, _template(probe.cand)[0]), []),
                             read)
        if found is None:
            # the candidate agrees with a reference record nothing paired: let it go (the
            # reference record stays unpaired); else the pair stands (a real divergence)
            if not _agrees_elsewhere(ref, cand, probe, errors[id(probe)], ref_free, read):
                out += groups[key]
            continue
        c, transform, err = found
        moved = _move(groups[key], c, transform, index)
        out += moved
    paired_ref = {p.ref.seq for p in out}
    paired_cand = {p.cand.seq for p in out}
    ref_left = list(ref_free) + [p.ref for p in given if p.ref.seq not in paired_ref]
    cand_left = list(cand_free) + [p.cand for p in given if p.cand.seq not in paired_cand]
    # a moved pair may take a record that was free (another call of its module)
    ref_left = list({r.seq: r for r in ref_left if r.seq not in paired_ref}.values())
    cand_left = list({c.seq: c for c in cand_left if c.seq not in paired_cand}.values())
    out, ref_left, cand_left = _free_pairs(ref, cand, out, ref_left, cand_left, read, first,
                                           {p.cand.seq for k in suspects for p in groups[k]})
    return out, ref_left, cand_left


def _probes(groups: Mapping[_Key, list], first: int) -> dict[_Key, list]:
    """Each template's pairs read: at the first step, in its first layers."""
    out: dict[_Key, list] = {}
    for key, ps in groups.items():
        at_first = sorted((p for p in ps if p.ref.step == first),
                          key=lambda p: (_template(p.ref)[0] or 0, p.ref.call))
        layers: list[int | None] = []
        chosen = []
        for p in at_first:
            layer = _template(p.ref)[0]
            if layer not in layers:
                if len(layers) == _PROBE_LAYERS:
                    break
                layers.append(layer)
            if p.ref.call == 0:
                chosen.append(p)
        if chosen:
            out[key] = chosen
    return out


def _suspects(probes: Mapping[_Key, list], errors: Mapping[int, float]) -> list[_Key]:
    """Templates whose every probe disagrees while a later probe of that step agrees far
    better (the error did not propagate)."""
    read = sorted((p for ps in probes.values() for p in ps), key=lambda p: p.ref.seq)
    out = []
    for key, ps in probes.items():
        errs = [errors[id(p)] for p in ps]
        if not errs or any(math.isnan(e) or e <= SUSPECT for e in errs):
            continue
        last = ps[0]
        later = [errors[id(q)] for q in read if q.ref.seq > last.ref.seq
                 and q.ref.step == last.ref.step and _key(q) != key]
        worst = min(errs)
        if any(not math.isnan(e) and e * RECOVERY < worst for e in later):
            out.append(key)
    return out


def _alternative(ref: Dump, cand: Dump, probe: Pair, error: float, pairs: Sequence[Pair],
                 pool: Sequence[Record], read: Reader
                 ) -> tuple[Record, str | None, float] | None:
    """The candidate record (and transform) of the probe's layer that agrees best with the
    probe's reference record, if it agrees far better than the pair did."""
    r = probe.ref
    best: tuple[Record, str | None, float] | None = None
    for c in pool:
        if c.seq == probe.cand.seq or not same_kind(r, c) or not c.has_data:
            continue
        options: set[str | None] = {t for t in _transforms(pairs, c) if t}
        options |= {lay.cand_transform for lay in layout_candidates(r.shape, c.shape)
                    if not lay.ref_transform}
        for transform in options or {None}:
            err = pair_error(ref, cand, r, c, probe.ref_transform, transform,
                             read)
            if not math.isnan(err) and (best is None or err < best[2]):
                best = (c, transform, err)
    if best is None or best[2] * RECOVERY >= error or best[2] > AGREE:
        return None
    return best


def _agrees_elsewhere(ref: Dump, cand: Dump, probe: Pair, error: float,
                      ref_free: Sequence[Record], read: Reader) -> bool:
    """Whether the probe's candidate record agrees far better with an unpaired reference
    record of its step and layer than with its partner."""
    c = probe.cand
    where = (probe.ref.step, _template(probe.ref)[0])
    for r in ref_free:
        if (r.step, _template(r)[0]) != where:
            continue
        for lay in layout_candidates(r.shape, c.shape):
            if lay.ref_transform:
                continue
            err = pair_error(ref, cand, r, c, None, lay.cand_transform, read)
            if not math.isnan(err) and err * RECOVERY < error and err <= AGREE:
                return True
    return False


def _index(records: Iterable[Record]) -> dict[tuple[str, int, int | None, int], Record]:
    """Records by (template, step, layer, call)."""
    out: dict[tuple[str, int, int | None, int], Record] = {}
    for r in records:
        layer, tmpl = _template(r)
        out.setdefault((tmpl, r.step, layer, r.call), r)
    return out


def _move(group: Sequence, model: Record, transform: str | None,
          index: Mapping[tuple[str, int, int | None, int], Record]) -> list:
    """The group's pairs with their candidate replaced by ``model``'s template at the same
    step, layer offset and call offset (another call of the same module: a norm called once
    for the residual sum and once for the normed output)."""
    probe = group[0]
    m_layer, m_tmpl = _template(model)
    r_layer0 = _template(probe.ref)[0]
    offset = (m_layer - r_layer0) if m_layer is not None and r_layer0 is not None else None
    calls = model.call - probe.cand.call
    out = []
    for p in group:
        layer = _template(p.ref)[0]
        c_layer = layer + offset if offset is not None and layer is not None else m_layer
        c = index.get((m_tmpl, p.ref.step, c_layer, p.cand.call + calls))
        if c is not None:
            out.append(replace(p, cand=c, cand_transform=transform, how=p.how + "+values",
                               evidence=(p.evidence + "; " if p.evidence else "")
                               + "re-paired by values: the first partner disagreed while "
                               "later tensors agreed"))
    return out


def _free_pairs(ref: Dump, cand: Dump, pairs: list, ref_free: list[Record],
                cand_free: list[Record], read: Reader, first: int,
                released: set[int]) -> tuple[list, list[Record], list[Record]]:
    """A candidate record a wrong pair released, paired with the unpaired reference record of
    its layer whose values agree (at the first step), for every step and layer."""
    cand_index = _index(cand_free)
    ref_by_layer: dict[tuple[int, int | None], list[Record]] = {}
    for r in ref_free:
        ref_by_layer.setdefault((r.step, _template(r)[0]), []).append(r)
    taken_ref: set[int] = set()
    taken_cand: set[int] = set()
    new = []
    for c in cand_free:
        if c.seq not in released or c.step != first or c.seq in taken_cand:
            continue
        layer = _template(c)[0]
        best = None
        for r in ref_by_layer.get((c.step, layer), []):
            if r.seq in taken_ref or not same_kind(r, c):
                continue
            for lay in layout_candidates(r.shape, c.shape):
                if lay.ref_transform:
                    continue
                err = pair_error(ref, cand, r, c, None, lay.cand_transform, read)
                if not math.isnan(err) and err < 1e-2 and (best is None or err < best[2]):
                    best = (r, lay.cand_transform, err)
        if best is None:
            continue
        r0, transform, _ = best
        r_tmpl, c_tmpl = _template(r0)[1], _template(c)[1]
        for r in ref_free:
            rl, rt = _template(r)
            if rt != r_tmpl or r.seq in taken_ref:
                continue
            partner = cand_index.get((c_tmpl, r.step, rl, r.call))
            if partner is None or partner.seq in taken_cand:
                continue
            new.append(Pair(r, partner, "values", None, None, transform, 0.95,
                            "values agree; released by a wrong pair"))
            taken_ref.add(r.seq)
            taken_cand.add(partner.seq)
    return (pairs + new, [r for r in ref_free if r.seq not in taken_ref],
            [c for c in cand_free if c.seq not in taken_cand])
