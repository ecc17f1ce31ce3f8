"""Structural auto-alignment: pairing records whose names no table knows.

Per-layer records are grouped into *templates*: the name with its layer index taken out
(``trunk.{}.sa.qp``), each template holding one instance per step, layer and call. Templates
are paired once, for every layer and step at the same time, by an order-preserving alignment
(the two engines compute a layer's ops in the same order) scored by:

- shapes: the tensors must hold the same elements, as is or after a layout transform;
- values: where some instance agrees (cosine >= 0.9) under the best layout, strong evidence;
  only a few instances are read, from early layers and steps where no bug has struck yet;
- names: shared name tokens (``q_norm`` and ``q_norm``), a tie-breaker.

Because templates are paired across all layers at once, a divergence in layer 1 does not
disturb the pairing there: the same template pair is known from layer 0 and step 0. What is
left is tried as a fused tensor (QKV, gate-up: a slice of the candidate per reference
template) or as blocks of a reference tensor. Every pair carries a confidence and its
evidence.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Callable, Iterable, Sequence

import numpy as np

from ..store.reader import Dump, Record, trimmer
from .kinds import Kind
from .layouts import (
    AGREE_COSINE,
    Layout,
    agreement,
    layout_candidates,
    relative_error,
    same_kind,
    squeeze_shape,
)
from .roles import role_of_name
from .transforms import apply_transform, merged_meta

__all__ = ["Template", "TemplatePair", "templates_of", "pair_templates", "layer_of"]

# an integer between delimiters (``layers.3.``, ``Qcur-3``), after ``_l`` (``cache_k_l3``), or
# after one letter that starts the name (``L3.qkv``, a VM's own tags)
_LAYER = re.compile(r"(?:^|(?<=[._\-/])|(?<=_l)|(?<=^[A-Za-z]))(\d+)(?=$|[._\-/: ])")
_TOKEN = re.compile(r"[a-z]+|\d+")
_SAMPLES = 3  # instances read per template pair to test values
_FUSED_AGREE = 0.05  # a fused tensor's part agrees with its reference this closely
_MIN_BLOCK = 8  # elements a block of a reference tensor holds at the least
#: layouts of q/k that are an engine's convention when later tensors agree as is
CONVENTIONS = ("rope_interleaved", "rope_halfsplit")


def layer_of(name: str) -> tuple[int | None, str]:
    """(layer index, template): the first delimited integer in the name is the layer."""
    m = _LAYER.search(name)
    if m is None:
        return None, name
    return int(m.group(1)), name[:m.start(1)] + "{}" + name[m.end(1):]


def _tokens(name: str) -> frozenset[str]:
    return frozenset(t for t in _TOKEN.findall(name.replace("{}", "").lower()) if t)


@dataclass
class Template:
    """One name pattern and its instances, keyed by (step, layer, call)."""

    name: str
    layer_bound: bool
    rank: float = 0.0  #: typical position within its layer (or the step)
    instances: dict[tuple[int, int, int], Record] = field(default_factory=dict)

    @property
    def shape(self) -> tuple[int, ...]:
        return next(iter(self.instances.values())).shape


def templates_of(records: Iterable[Record]) -> list[Template]:
    """The records' templates, ordered by their position within a layer (per-layer ones)
    or within the step (the rest)."""
    by_name: dict[str, Template] = {}
    first_seq: dict[tuple[int, int], int] = {}  # (step, layer) -> first seq seen
    step_first: dict[int, int] = {}
    records = list(records)
    for r in records:
        layer, name = layer_of(r.name)
        step_first.setdefault(r.step, r.seq)
        if layer is not None:
            first_seq.setdefault((r.step, layer), r.seq)
        t = by_name.setdefault(name, Template(name, layer is not None))
        t.instances.setdefault((r.step, -1 if layer is None else layer, r.call), r)
    for t in by_name.values():
        key = min(t.instances)
        r = t.instances[key]
        base = first_seq[(key[0], key[1])] if t.layer_bound else step_first[key[0]]
        t.rank = r.seq - base
    return sorted(by_name.values(), key=lambda t: (t.layer_bound, t.rank))


@dataclass(frozen=True)
class TemplatePair:
    """Two templates paired, the layout that compares them, and why."""

    ref: Template
    cand: Template
    layout: Layout
    confidence: float
    evidence: str
    agree: int = 0  #: instances read whose values agree under the layout
    tried: int = 0  #: instances read
    shapes: tuple[tuple[int, ...], tuple[int, ...]] | None = None  #: what the layout fits
    cosine: float = 0.0  #: mean cosine similarity of the instances read

    def layout_for(self, ref_shape: tuple[int, ...], cand_shape: tuple[int, ...]) -> Layout:
        """The layout for one instance: the template's, or, where the instance's shapes
        differ (a decode step's single token), the first that fits them, with the same RoPE
        convention and the same block."""
        if self.layout.ref_transform and squeeze_shape(ref_shape) == squeeze_shape(cand_shape):
            return Layout()  # the whole tensor where the template held a part (one token)
        if self.shapes is None or self.shapes == (ref_shape, cand_shape) \
                or self.layout.ref_transform:
            return self.layout
        fits = layout_candidates(ref_shape, cand_shape)
        lay = fits[0] if fits and fits[0].plausible else Layout()
        if self.layout.convention:
            convention = (self.layout.cand_transform or "").split("|")[0]
            spec = "|".join(filter(None, (convention, lay.cand_transform)))
            lay = Layout(cand_transform=spec, convention=True)
        return lay


Reader = Callable[[Dump, Record], np.ndarray]


class _Scorer:
    """Scores of template pairs, reading a few instances' values (cached)."""

    def __init__(self, ref: Dump, cand: Dump, read: Reader) -> None:
        self.ref, self.cand, self.read = ref, cand, read
        self.cand_meta = merged_meta(ref, cand)

    def shared_keys(self, a: Template, b: Template) -> list[tuple[int, int, int]]:
        """The instances to read: the first shared ones whose data both sides kept (a
        statistics-only prefill leaves its decode steps to speak), else the first shared."""
        keys = sorted(set(a.instances) & set(b.instances))
        kept = [k for k in keys if a.instances[k].has_data and b.instances[k].has_data]
        keys = kept or keys
        if len(keys) <= _SAMPLES:
            return keys
        return [keys[0], keys[1], keys[len(keys) // 2]]

    def _try(self, a: Template, b: Template, keys: list[tuple[int, int, int]],
             lay: Layout) -> tuple[int, float, int]:
        """(instances agreeing, summed cosine, instances compared) under one layout (an
        instance of other shapes than the first, a prefill's beside a decode step's, is not
        compared under the first's layout)."""
        r0, c0 = a.instances[keys[0]], b.instances[keys[0]]
        agree, total_cos, compared = 0, 0.0, 0
        for key in keys:
            r, c = a.instances[key], b.instances[key]
            if r.shape != r0.shape or c.shape != c0.shape:
                continue
            compared += 1
            try:
                cos = agreement(
                    apply_transform(lay.ref_transform, self.read(self.ref, r), self.ref.meta),
                    apply_transform(lay.cand_transform, self.read(self.cand, c), self.cand_meta),
                    trimmer(self.ref, self.cand))
            except Exception:  # a layout that does not apply to this instance
                cos = -1.0
            agree += cos >= AGREE_COSINE
            total_cos += max(cos, 0.0)
        return agree, total_cos, compared

    def readable(self, p: TemplatePair) -> bool:
        keys = self.shared_keys(p.ref, p.cand)
        return bool(keys) and p.ref.instances[keys[0]].has_data \
            and p.cand.instances[keys[0]].has_data

    def error(self, p: TemplatePair) -> float:
        """Relative error of a template pair's first shared instance (inf: none to read)."""
        keys = self.shared_keys(p.ref, p.cand)
        if not keys:
            return math.inf
        r, c = p.ref.instances[keys[0]], p.cand.instances[keys[0]]
        if not (r.has_data and c.has_data):
            return math.inf
        try:
            err = relative_error(
                apply_transform(p.layout.ref_transform, self.read(self.ref, r), self.ref.meta),
                apply_transform(p.layout.cand_transform, self.read(self.cand, c),
                                self.cand_meta), trimmer(self.ref, self.cand))
        except Exception:  # a layout that does not apply to this instance
            return math.inf
        return math.inf if math.isnan(err) else err

    def evaluate(self, a: Template, b: Template) -> tuple[Layout, int, int, float] | None:
        """(best layout, instances agreeing, instances tried, mean cosine), or None when no
        layout fits.

        When no layout makes any instance agree, the RoPE layout conventions are tried on
        top (flagged ``convention``: pair_templates keeps them only if later tensors agree)."""
        keys = self.shared_keys(a, b)
        if not keys:
            return None
        r0, c0 = a.instances[keys[0]], b.instances[keys[0]]
        layouts = layout_candidates(r0.shape, c0.shape)
        if not layouts:
            return None
        if not (r0.has_data and c0.has_data):
            return (layouts[0], 0, 0, 0.0) if layouts[0].plausible else None
        scored = [(self._try(a, b, keys, lay), lay) for lay in layouts]
        (agree, total, compared), best = max(scored, key=lambda s: s[0][:2])
        if not agree and a.layer_bound and not best.ref_transform:
            # the best RoPE convention where one agrees (as any layout: an instance read
            # agreeing; a layer past a bug, or a decode step, may not)
            options = [Layout(cand_transform="|".join(filter(None, (convention,
                                                                    lay.cand_transform))),
                              plausible=lay.plausible, convention=True)
                       for convention in CONVENTIONS for lay in layouts[:3]]
            found, option = max(((self._try(a, b, keys, o), o) for o in options),
                                key=lambda s: s[0][:2])
            if found[0]:
                return option, found[0], len(keys), found[1] / max(found[2], 1)
        if not agree and not layouts[0].plausible:
            return None  # an implausible layout needs values to vouch for it
        # the mean cosine of the instances compared (not of every one sampled: a decode
        # step's instance beside a prefill's is not compared, and would pull it below)
        return (best if agree else layouts[0]), agree, len(keys), total / max(compared, 1)


def _score(scorer: _Scorer, a: Template, b: Template, need_values: bool, *,
           blocks: bool = False) -> tuple[float, TemplatePair] | None:
    if a.layer_bound != b.layer_bound:
        return None
    if not same_kind(next(iter(a.instances.values())), next(iter(b.instances.values()))):
        return None  # integer ids or positions never pair with float tensors
    found = scorer.evaluate(a, b)
    if found is None:
        return None
    layout, agree, tried, cosine = found
    if layout.ref_transform and not blocks and not layout.last_row:
        return None  # blocks pair after the one-to-one alignment (several to a reference)
    if need_values and not agree:
        return None
    ta, tb = _tokens(a.name), _tokens(b.name)
    name_sim = len(ta & tb) / len(ta | tb) if ta | tb else 0.0
    # values that could be read and never agree weaken a shape match (both engines may
    # record tensors with the same values, a tie that the layout-free one wins)
    score = (1.0 if agree or not tried else 0.25) + 3.0 * (agree / tried if tried else 0.0)
    score += 0.5 * name_sim + (0.5 if agree and not layout.label else 0.0)
    # closer values win among agreeing ones (a norm's output agrees with its input, less so);
    # among ones that never agree, the closest is still the tensor the candidate's is meant
    # to be (silu(up) * gate: 0.82 with the down projection's input, 0.17 with the gate's)
    score += 2.0 * max(cosine - AGREE_COSINE, 0.0) / (1.0 - AGREE_COSINE) if agree else \
        0.5 * max(cosine, 0.0)
    if agree:  # and values that are the same, to a relative error a cosine cannot tell
        # (a residual before and after the MLP's small addition: cosine 0.98 against 1.0)
        err = scorer.error(TemplatePair(a, b, layout, 0.0, "", agree, tried, ((), ())))
        score += min(max(-math.log10(max(err, 1e-12)) / 6.0, 0.0), 1.0) \
            if math.isfinite(err) else 0.0
    shape = "x".join(map(str, squeeze_shape(a.shape))) or "scalar"
    parts = [f"shape {shape}" + (f" via {layout.label}" if layout.label else "")]
    if tried:
        parts.append(f"values agree in {agree}/{tried} instances read")
    if name_sim:
        parts.append(f"name tokens {name_sim:.0%} shared")
    confidence = 0.95 if agree else (0.6 if layout.plausible else 0.3)
    key = scorer.shared_keys(a, b)[0]
    return score, TemplatePair(a, b, layout, confidence, "; ".join(parts), agree, tried,
                               (a.instances[key].shape, b.instances[key].shape), cosine)


def _align_ordered(ref: Sequence[Template], cand: Sequence[Template],
                   score: Callable[[Template, Template], tuple[float, TemplatePair] | None]
                   ) -> list[TemplatePair]:
    """Pairs whose values agree best both ways are anchors, in any order (engines may
    compute V before K); the rest are aligned preserving order, maximising the total score
    (an LCS with weights)."""
    cells: dict[tuple[int, int], tuple[float, TemplatePair]] = {}
    for i in range(len(ref)):
        for j in range(len(cand)):
            hit = score(ref[i], cand[j])
            if hit is not None:
                cells[(i, j)] = hit
    agreeing = {k: v for k, v in cells.items() if v[1].agree}
    best_row: dict[int, tuple[int, int]] = {}
    best_col: dict[int, tuple[int, int]] = {}
    for (i, j), (s, _) in agreeing.items():
        if i not in best_row or s > cells[best_row[i]][0]:
            best_row[i] = (i, j)
        if j not in best_col or s > cells[best_col[j]][0]:
            best_col[j] = (i, j)
    anchors = [key for key in best_row.values() if best_col.get(key[1]) == key]
    rows = [i for i in range(len(ref)) if i not in {a[0] for a in anchors}]
    cols = [j for j in range(len(cand)) if j not in {a[1] for a in anchors}]
    rest = {(rows.index(i), cols.index(j)): v for (i, j), v in cells.items()
            if i in rows and j in cols and all((i < a) == (j < b) for a, b in anchors)}
    pairs = [cells[a][1] for a in anchors] + _lcs(len(rows), len(cols), rest)
    rank = {id(t): k for k, t in enumerate(ref)}
    return sorted(pairs, key=lambda p: rank[id(p.ref)])


def _alone_in_shape(scorer: _Scorer, ref: Sequence[Template], cand: Sequence[Template],
                    found: Sequence[TemplatePair], need_values: bool) -> list[TemplatePair]:
    """A leftover candidate template and the leftover reference template of its dims (the
    same dims in any order: (tokens, heads, head_dim) and (heads, tokens, head_dim)) pair,
    whatever their order against the pairs found: the only one, or the one whose values are
    clearly the closest (cosine twice the next one's). An engine may run RoPE on q after
    computing k and v (llama.cpp rotates q first), and where their values disagree (a RoPE
    bug) nothing else would pair them."""
    used_ref, used_cand = {id(p.ref) for p in found}, {id(p.cand) for p in found}

    def dims(t: Template) -> tuple[int, ...]:
        return tuple(sorted(squeeze_shape(t.shape)))

    left_ref = [t for t in ref if id(t) not in used_ref]
    out = []
    for c in (t for t in cand if id(t) not in used_cand and len(dims(t)) >= 2):
        hits = [h for h in (_score(scorer, r, c, need_values) for r in left_ref
                            if dims(r) == dims(c)) if h is not None]
        hits.sort(key=lambda h: -h[1].cosine)
        if not hits or (len(hits) > 1 and hits[0][1].cosine < 2.0 * max(hits[1][1].cosine,
                                                                        0.05)):
            continue
        p = hits[0][1]
        left_ref.remove(p.ref)
        out.append(TemplatePair(p.ref, p.cand, p.layout, min(p.confidence, 0.6),
                                p.evidence + "; the tensor of these dims left on either side "
                                "whose values are closest (computed in another order)",
                                p.agree, p.tried, p.shapes, p.cosine))
    return out


def _lcs(n: int, m: int, cells: dict[tuple[int, int], tuple[float, TemplatePair]]
         ) -> list[TemplatePair]:
    """Order-preserving pairs maximising the total score."""
    table = np.zeros((n + 1, m + 1))
    for i in range(n - 1, -1, -1):
        for j in range(m - 1, -1, -1):
            best = max(table[i + 1, j], table[i, j + 1])
            hit = cells.get((i, j))
            if hit is not None:
                best = max(best, hit[0] + table[i + 1, j + 1])
            table[i, j] = best
    out: list[TemplatePair] = []
    i = j = 0
    while i < n and j < m:
        hit = cells.get((i, j))
        if hit is not None and table[i, j] == hit[0] + table[i + 1, j + 1]:
            out.append(hit[1])
            i, j = i + 1, j + 1
        elif table[i, j] == table[i + 1, j]:
            i += 1
        else:
            j += 1
    return out


def _ambiguity(pairs: list[TemplatePair], ref: Sequence[Template],
               cand: Sequence[Template]) -> list[TemplatePair]:
    """Lower the confidence of shape-only pairs whose shape other templates share too."""
    out = []
    for p in pairs:
        if p.confidence < 0.9:
            shape = squeeze_shape(p.ref.shape)
            rivals = sum(squeeze_shape(t.shape) == shape for t in ref if t is not p.ref)
            rivals += sum(squeeze_shape(t.shape) == squeeze_shape(p.cand.shape)
                          for t in cand if t is not p.cand)
            if rivals:
                p = TemplatePair(p.ref, p.cand, p.layout, min(p.confidence, 0.5),
                                 p.evidence + f"; by order among {rivals + 2} same-shaped "
                                              "tensors (low confidence)", p.agree, p.tried,
                                 p.shapes)
        out.append(p)
    return out


def _after_rope(t: Template) -> bool:
    """Whether a reference template holds q or k after RoPE (by its name's role)."""
    return role_of_name(next(iter(t.instances.values())).name).op in (Kind.Q_ROPE, Kind.K_ROPE)


def _conventions(pairs: list[TemplatePair]) -> list[TemplatePair]:
    """Keep a RoPE layout convention (values agree only after permuting the head dim)
    where q or k after RoPE agrees under it too (the engine's RoPE rotates its layout's
    pairs: llama.cpp's GGUF weights hold q/k so), or where a later tensor of the layer
    agrees as is. A layout bug also matches after a permutation, but then neither holds:
    that pair keeps no transform, and the diagnosis names the layout. (A bug in attention
    makes every later tensor disagree; q and k after RoPE still vouch for the layout.)"""
    rotated = any(p.layout.convention and p.agree and _after_rope(p.ref) for p in pairs)
    out = []
    for i, p in enumerate(pairs):
        if p.layout.convention:
            later = any(q.agree and not q.layout.convention for q in pairs[i + 1:]
                        if q.ref.layer_bound)
            if later or rotated:
                why = ("q/k after RoPE agree under it too" if rotated else
                       "later tensors agree as is")
                p = TemplatePair(p.ref, p.cand, p.layout, 0.9,
                                 p.evidence + "; values agree only after a RoPE layout "
                                 f"permutation and {why}: the candidate's layout "
                                 "convention", p.agree, p.tried, p.shapes)
            else:
                p = TemplatePair(p.ref, p.cand, Layout(), 0.3,
                                 p.evidence.split(" via ")[0] + "; values agree only after a "
                                 "RoPE layout permutation and nothing later agrees "
                                 "(a layout bug?)", 0, p.tried, p.shapes)
        out.append(p)
    return out


def _fused(scorer: _Scorer, ref: list[Template], cand: list[Template]) -> list[TemplatePair]:
    """A leftover candidate template whose last dim is the sum of consecutive leftover
    reference templates' last dims (fused QKV, gate-up): one slice per reference."""
    out: list[TemplatePair] = []
    for c in cand:
        cs = squeeze_shape(c.shape)
        if not c.layer_bound or len(cs) < 1:
            continue
        for k in (3, 2):
            # consecutive leftovers, or with one between (silu(gate) between gate and up)
            for group in _windows(ref, k):
                shapes = [squeeze_shape(t.shape) for t in group]
                if any(t.name in {p.ref.name for p in out} for t in group):
                    continue
                if any(s[:-1] != cs[:-1] or not s for s in shapes):
                    continue
                if sum(s[-1] for s in shapes) != cs[-1]:
                    continue
                offset, made = 0, []
                for t, s in zip(group, shapes):
                    lay = Layout(cand_transform=f"squeeze|slice(-1, {offset}, {offset + s[-1]})")
                    offset += s[-1]
                    made.append(TemplatePair(t, c, lay, 0.8,
                                             f"fused: {c.name} holds {len(group)} tensors "
                                             f"along its last dim ({cs[-1]} = "
                                             f"{' + '.join(str(s[-1]) for s in shapes)})"))
                if any(scorer.error(p) > _FUSED_AGREE for p in made if scorer.readable(p)):
                    continue  # values decide: these references are not this tensor's parts
                out += made
                break
            else:
                continue
            break
    return out


def _windows(items: list[Template], k: int) -> Iterable[list[Template]]:
    """Groups of ``k`` items in order, spanning at most ``k + 1`` places."""
    for start in range(len(items) - k + 1):
        yield items[start:start + k]
    for start in range(len(items) - k):
        span = items[start:start + k + 1]
        for skip in range(1, k):
            yield span[:skip] + span[skip + 1:]


def _rank(scorer: _Scorer, hit: tuple[float, TemplatePair]) -> tuple[float, ...]:
    """Blocks: the reference whose values agree most closely wins (a block of q after RoPE
    can nearly agree with the same block before it, where the rotation is slow; q before its
    norm agrees in direction with q after it, not in scale)."""
    p = hit[1]
    return (p.agree / p.tried if p.tried else 0.0, round(p.cosine, 4), -scorer.error(p),
            hit[0])


def _blocks(scorer: _Scorer, ref: list[Template], cand: list[Template],
            taken: set[str]) -> list[TemplatePair]:
    """Leftover 1-D candidate templates that hold one block of a reference tensor: the block
    is found by values where they agree, else from the trailing number of the name."""
    out: list[TemplatePair] = []
    for c in cand:
        # a block of a few elements "agrees" by chance (a few sigmoid outputs near 0.5 with
        # any few positive numbers), so a block holds at least _MIN_BLOCK
        if c.name in taken or len(squeeze_shape(c.shape)) != 1 \
                or squeeze_shape(c.shape)[0] < _MIN_BLOCK:
            continue
        best: tuple[float, TemplatePair] | None = None
        for r in ref:
            hit = _score(scorer, r, c, need_values=False, blocks=True)
            trailing = re.search(r"(\d+)\D*$", c.name.replace("{}", ""))
            if hit is None and trailing is not None:
                size = squeeze_shape(c.shape)[0]
                keys = scorer.shared_keys(r, c)
                if keys and (r.instances[keys[0]].numel % size == 0
                             and size * (int(trailing.group(1)) + 1)
                             <= r.instances[keys[0]].numel):
                    ta, tb = _tokens(r.name), _tokens(c.name)
                    sim = len(ta & tb) / len(ta | tb)
                    lay = Layout(ref_transform=f"block({size}, {trailing.group(1)})")
                    hit = (0.5 + sim, TemplatePair(
                        r, c, lay, 0.4, f"block {trailing.group(1)} of {size} elements, by its "
                                        f"name; name tokens {sim:.0%} shared (low confidence)"))
            if hit is not None and hit[1].layout.ref_transform and (
                    best is None or _rank(scorer, hit) > _rank(scorer, best)):
                best = hit
        if best is not None and best[0] > 0.5:
            out.append(best[1])
    return out


def pair_templates(ref: Dump, cand: Dump, ref_records: Sequence[Record],
                   cand_records: Sequence[Record], read: Reader, *,
                   need_values: bool = False) -> list[TemplatePair]:
    """Pair the templates of the given (so far unpaired) records.

    ``need_values`` accepts a pair only where values agree somewhere (used after name tables
    paired the rest, when what is left often has no counterpart at all)."""
    scorer = _Scorer(ref, cand, read)
    rt, ct = templates_of(ref_records), templates_of(cand_records)
    pairs: list[TemplatePair] = []
    for bound in (False, True):
        a = [t for t in rt if t.layer_bound == bound]
        b = [t for t in ct if t.layer_bound == bound]
        found = _align_ordered(a, b, lambda x, y: _score(scorer, x, y, need_values))
        found += _alone_in_shape(scorer, a, b, found, need_values)
        pairs += _ambiguity(_conventions(found), a, b)
    used_ref = {p.ref.name for p in pairs}
    used_cand = {p.cand.name for p in pairs}
    left_ref = [t for t in rt if t.name not in used_ref]
    left_cand = [t for t in ct if t.name not in used_cand]
    fused = _fused(scorer, left_ref, left_cand)
    pairs += fused
    used_cand |= {p.cand.name for p in fused}
    pairs += _blocks(scorer, rt, left_cand, used_cand)
    return pairs
