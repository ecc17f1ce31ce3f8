"""Pairing the records of two dumps.

Passes, each on what the previous ones left:

1. ``name``: the same name and call index in the same step;
2. ``mapping``: the user's mapping file (docs/mapping.md): rename rules with transforms;
3. ``table``: the same canonical name through each side's name table (align.tables), with
   the layout transforms the tables name (one candidate record may cover several reference
   records, and blocks of one reference record);
4. ``normalized``: the same name after wrapper prefixes (``module.``, ``_orig_mod.``) are
   dropped and case folded;
5. ``structure``: structural auto-alignment (align.structure) of what is left, by layer
   index, order, shapes, values and name tokens. After the name tables or a mapping file's
   rules paired the two dumps, only pairs whose values agree somewhere are taken from it
   (what a mapping leaves unpaired stays unpaired, and is listed, unless its values pair it).

Any pair whose shapes differ gets a layout transform (align.layouts) when one fits. Then every
pair is checked by its values (align.verify): a wrong pair is re-paired, not reported as a
divergence.
"""

from __future__ import annotations

import re
from dataclasses import replace
from typing import TYPE_CHECKING, Callable, Sequence

import numpy as np

from ..store.reader import Dump, Record, trimmer
from . import kinds
from .kinds import Kind as K
from .layouts import Layout, agreement, layout_candidates, squeeze_shape
from .pairs import Alignment, Pair
from .structure import pair_templates
from .tables import NameTable, detect_table
from .transforms import apply_transform, merged_meta
from .verify import check_pairs

if TYPE_CHECKING:
    from .mapping import MappingFile

__all__ = ["Pair", "Alignment", "align", "squeeze_shape", "normalize_name"]

_WRAPPER_PREFIXES = re.compile(
    r"^(?:(?:module|_orig_mod|base_model\.model|_fsdp_wrapped_module)\.)+")


def normalize_name(name: str) -> str:
    """A name with wrapper prefixes removed and case folded."""
    return _WRAPPER_PREFIXES.sub("", name).lower()


class _Step:
    """One step's unpaired records and its pairs so far."""

    def __init__(self, number: int, ref: list[Record], cand: list[Record]) -> None:
        self.number = number
        self.ref = ref
        self.cand = cand
        self.free_ref = {r.seq: r for r in ref}
        self.free_cand = {c.seq: c for c in cand}
        self.pairs: list[Pair] = []

    def take(self, pair: Pair, *, keep_ref: bool = False, keep_cand: bool = False) -> None:
        self.pairs.append(pair)
        if not keep_ref:
            self.free_ref.pop(pair.ref.seq, None)
        if not keep_cand:
            self.free_cand.pop(pair.cand.seq, None)


def _by_name(step: _Step, tables: tuple[NameTable, NameTable] | None = None) -> None:
    """The same name and call; among ranks (docs/format.md) the same rank first, else the
    first free record of that name, so each record is paired once. A name both sides' tables
    know but read as different tensors is left to the table pass (vLLM's Gemma
    ``model.embed_tokens`` gives the rows, transformers' the rows times sqrt(hidden))."""
    by_rank: dict[tuple[str, int, object], Record] = {}
    by_name: dict[tuple[str, int], list[Record]] = {}
    for c in step.free_cand.values():
        by_rank.setdefault((c.name, c.call, c.extra.get("rank")), c)
        by_name.setdefault((c.name, c.call), []).append(c)
    for r in list(step.free_ref.values()):
        found = by_rank.get((r.name, r.call, r.extra.get("rank")))
        if found is None or found.seq not in step.free_cand:
            found = next((x for x in by_name.get((r.name, r.call), ())
                          if x.seq in step.free_cand), None)
        if found is not None and not (tables and _read_apart(tables, r.name)):
            step.take(Pair(r, found, "name"))


def _read_apart(tables: tuple[NameTable, NameTable], name: str) -> bool:
    """Whether the two tables both know ``name`` and give it different canonical names."""
    ref, cand = _canonical(tables[0], name), _canonical(tables[1], name)
    return ref is not None and cand is not None and ref != cand


def _by_mapping(step: _Step, mapping: MappingFile) -> None:
    """Every candidate record a rule matches is paired: several with one reference record
    (its blocks, or repeated calls where the reference has one), one with several."""
    by_name = {(r.name, r.call): r for r in step.ref}
    used: set[int] = set()
    for c in list(step.free_cand.values()):
        hits = mapping.lookup(c.name)
        for hit in hits:
            r = by_name.get((hit.ref_name, c.call)) or by_name.get((hit.ref_name, 0))
            if r is not None and (r.seq in step.free_ref or r.seq in used):
                step.take(Pair(r, c, "mapping", None, hit.ref_transform, hit.cand_transform),
                          keep_ref=True, keep_cand=True)
                used.add(r.seq)
        if hits:
            step.free_cand.pop(c.seq, None)
    for seq in used:
        step.free_ref.pop(seq, None)


def _canonical(table: NameTable, name: str) -> str | None:
    hit = table.lookup_rule(name)
    return hit[0] if hit else None


def _by_table(step: _Step, tables: tuple[NameTable, NameTable]) -> None:
    ref_table, cand_table = tables
    by_canon: dict[tuple[str, int], Record] = {}
    for r in step.free_ref.values():
        hit = ref_table.lookup_rule(r.name)
        if hit is not None:
            by_canon.setdefault((hit[0], r.call), r)
    used_ref: set[int] = set()
    for c in list(step.free_cand.values()):
        # a fused record (qkv_proj) is split by several rules, one pair per part
        hits = cand_table.lookup_all(c.name)
        seen: set[str] = set()
        for canonical, cand_transform, counterpart in hits:
            ref = by_canon.get((canonical, c.call))
            if ref is None or canonical in seen:
                continue
            seen.add(canonical)
            ref_rule = ref_table.lookup_rule(ref.name)
            # the reference into the canonical layout first, then cut to what the candidate
            # holds
            ref_transform = "|".join(filter(None, (ref_rule[1] if ref_rule else None,
                                                   counterpart))) or None
            step.take(Pair(ref, c, "table", canonical, ref_transform, cand_transform),
                      keep_ref=True, keep_cand=True)
            used_ref.add(ref.seq)
        if seen:
            step.free_cand.pop(c.seq, None)
    for seq in used_ref:
        step.free_ref.pop(seq, None)


def _feeds_final_norm(dump: Dump, out: Record, norm: Record) -> bool | None:
    """Whether ``out`` is what the final norm ``norm`` normalized: each row of the norm's
    output its input row over its RMS, times one weight vector for every row (fitted, to
    1e-3). None where one row cannot tell (a decode step)."""
    try:
        x = np.asarray(dump.read(out), dtype=np.float64)
        y = np.asarray(dump.read(norm), dtype=np.float64)
    except Exception:  # (an unreadable record: nothing to vouch with)
        return False
    if x.size != y.size or x.size == 0 or x.shape[-1] != y.shape[-1]:
        return False
    x, y = x.reshape(-1, x.shape[-1]), y.reshape(-1, y.shape[-1])
    if x.shape[0] < 2:
        return None
    xn = x / np.maximum(np.sqrt((x * x).mean(axis=1, keepdims=True)), 1e-30)
    w = (y * xn).sum(axis=0) / np.maximum((xn * xn).sum(axis=0), 1e-30)
    return bool(np.linalg.norm(y - xn * w) <= 1e-3 * max(float(np.linalg.norm(y)), 1e-30))


def _last_layer_out(step: _Step, tables: tuple[NameTable, NameTable], ref: Dump, cand: Dump,
                    vouched: dict[int, bool]) -> None:
    """The last layer's output where one side has no record of that layer holding it
    (``NameTable.last_out``: vLLM's and SGLang's final norm adds the residual first, and
    its second output is it), paired with the other side's record of the output of the
    last layer its records show in the step, once that record is seen to be what the other
    side's final norm normalized (a recording of some layers only ends before the model's
    last): at a step of several tokens, and at one-token steps after such a step vouched."""
    sides = ((step.free_ref, tables[0], step.free_cand, tables[1], cand, step.cand, False),
             (step.free_cand, tables[1], step.free_ref, tables[0], ref, step.ref, True))
    for mine, table, free_other, other_table, other_dump, other_all, is_cand in sides:
        holder = next((r for r in mine.values() if r.name == table.last_out), None)
        if table.last_out is None or holder is None or vouched.get(int(is_cand)) is False:
            continue  # (refused at an earlier step: never read again)
        canon = {r.seq: _canonical(other_table, r.name) for r in other_all}
        parsed = [kinds.parse(c) for c in canon.values() if c]
        layers = [p.layer for p in parsed if p is not None and p.layer is not None]
        if not layers:
            continue
        canonical = f"layers.{max(layers)}.{K.OUT.value}"
        out = next((r for r in free_other.values() if canon.get(r.seq) == canonical), None)
        norm = next((r for r in other_all if canon.get(r.seq) == K.FINAL_NORM.value), None)
        if out is None or norm is None:
            continue
        seen = _feeds_final_norm(other_dump, out, norm)
        if seen is not None:
            vouched[int(is_cand)] = vouched.get(int(is_cand), True) and seen
        if not vouched.get(int(is_cand), False):
            continue
        step.take(Pair(out, holder, "table", canonical) if is_cand else
                  Pair(holder, out, "table", canonical))


def _by_normalized(step: _Step, tables: tuple[NameTable, NameTable] | None = None) -> None:
    """Names equal once normalized (normalize_name), unless the tables read them apart."""
    by_norm: dict[tuple[str, int], Record] = {}
    for c in step.free_cand.values():
        if not (tables and _canonical(tables[1], c.name)):  # the table pass had it
            by_norm.setdefault((normalize_name(c.name), c.call), c)
    for r in list(step.free_ref.values()):
        found = by_norm.pop((normalize_name(r.name), r.call), None)
        if found is not None:
            step.take(Pair(r, found, "normalized"))


def _reader() -> Callable[[Dump, Record], np.ndarray]:
    cache: dict[tuple[int, int], np.ndarray] = {}

    def read(dump: Dump, rec: Record) -> np.ndarray:
        key = (id(dump), rec.seq)
        if key not in cache:
            cache[key] = dump.read(rec)
        return cache[key]

    return read


def _fit_layout(ref: Dump, cand: Dump, pair: Pair,
                read: Callable[[Dump, Record], np.ndarray],
                chosen: dict[tuple[str, str, tuple[int, ...], tuple[int, ...]], Layout]) -> Pair:
    """A pair whose shapes differ (after its transforms) gets the layout that fits, chosen
    once per (reference name pattern, candidate name pattern, shapes) by values."""
    if pair.ref_transform or pair.cand_transform:
        return pair
    if squeeze_shape(pair.ref.shape) == squeeze_shape(pair.cand.shape):
        return pair
    key = (re.sub(r"\d+", "#", pair.ref.name), re.sub(r"\d+", "#", pair.cand.name),
           pair.ref.shape, pair.cand.shape)
    lay = chosen.get(key)
    if lay is None:
        layouts = layout_candidates(pair.ref.shape, pair.cand.shape)
        if not layouts:
            return pair
        lay = layouts[0]
        if pair.ref.has_data and pair.cand.has_data:
            best = -2.0
            r, c = read(ref, pair.ref), read(cand, pair.cand)
            for option in layouts:
                try:
                    cos = agreement(apply_transform(option.ref_transform, r, ref.meta),
                                    apply_transform(option.cand_transform, c,
                                                    merged_meta(ref, cand)),
                                    trimmer(ref, cand))
                except Exception:  # a layout that does not apply here
                    continue
                if cos > best + 1e-9:
                    best, lay = cos, option
        chosen[key] = lay
    return replace(pair, ref_transform=lay.ref_transform, cand_transform=lay.cand_transform)


def align(ref: Dump, cand: Dump, *, use_tables: bool = True,
          mapping: MappingFile | None = None) -> Alignment:
    """Pair the two dumps' records (see the module docstring for the passes).

    ``use_tables=False`` leaves out the name tables; ``mapping`` is a loaded mapping file."""
    tables = None
    if use_tables:  # each side's table, the one made for its architecture first
        ref_table = detect_table((r.name for r in ref.records), ref.meta)
        cand_table = detect_table((c.name for c in cand.records), cand.meta)
        if ref_table is not None and cand_table is not None:
            tables = (ref_table, cand_table)
    ignored = 0
    ref_steps: dict[int, list[Record]] = {}
    cand_steps: dict[int, list[Record]] = {}
    for side, records, by_step in (("ref", ref.records, ref_steps),
                                   ("cand", cand.records, cand_steps)):
        for r in records:
            if mapping is not None and mapping.ignored(r.name, side):
                ignored += 1
                continue
            by_step.setdefault(r.step, []).append(r)
    steps = [_Step(s, ref_steps.get(s, []), cand_steps.get(s, []))
             for s in sorted(set(ref_steps) | set(cand_steps))]
    vouched: dict[int, bool] = {}  # (align._last_layer_out) by side: 0 ref, 1 cand
    for step in steps:
        _by_name(step, tables)
        if mapping is not None and step.free_cand:
            _by_mapping(step, mapping)
        if tables is not None and step.free_cand:
            _by_table(step, tables)
            _last_layer_out(step, tables, ref, cand, vouched)
        if step.free_cand:
            _by_normalized(step, tables)
    read = _reader()
    # records that repeat an earlier record's data take no part in the structural pass and
    # are set aside when nothing paired them
    repeats = _repeats(ref), _repeats(cand)
    left_ref = [r for s in steps for r in s.free_ref.values() if r.seq not in repeats[0]]
    # a candidate record its table knows had its chance in the table pass: what it holds is
    # not in the reference (vLLM Gemma's unscaled embedding rows), so no other pass guesses
    left_cand = [c for s in steps for c in s.free_cand.values() if c.seq not in repeats[1]
                 and (tables is None or _canonical(tables[1], c.name) is None)]
    if left_ref and left_cand:
        # what is left after a table, or a mapping that paired most records, often has no
        # counterpart: a pair there needs values that agree. After a mapping of a few rules
        # (the names lockstep could not pair), the rest is aligned as with no mapping
        mapped = sum(len(s.pairs) for s in steps)
        need_values = tables is not None or bool(
            mapping and mapping.rules and mapped >= len(left_cand))
        _by_structure(ref, cand, steps, left_ref, left_cand, read, need_values=need_values)
    aliased = _drop_repeats(steps, *repeats)
    chosen: dict = {}
    pairs = [_fit_layout(ref, cand, p, read, chosen) for s in steps for p in s.pairs]
    # every pair checked by its values: wrong pairs re-paired or let go (align.verify)
    pairs, ref_left, cand_left = check_pairs(
        ref, cand, pairs, [r for s in steps for r in s.free_ref.values()],
        [c for s in steps for c in s.free_cand.values()], read)
    if tables is not None:  # pairs found by other passes get their canonical name too
        pairs = [p if p.canonical else replace(p, canonical=_canonical(tables[0], p.ref.name))
                 for p in pairs]
    pairs.sort(key=lambda p: (p.ref.step, p.ref.seq, p.cand.seq))
    ref_only = sorted(ref_left, key=lambda r: r.seq)
    cand_only = sorted(cand_left, key=lambda c: c.seq)
    return Alignment(tuple(pairs), tuple(ref_only), tuple(cand_only),
                     (tables[0].name, tables[1].name) if tables else None, ignored, aliased)


def _repeats(dump: Dump) -> set[int]:
    """Seqs of the records whose data is an earlier record's (a module returning its child's
    tensor, recorded again as a pointer)."""
    seen: set[int] = set()
    out: set[int] = set()
    for r in dump.records:
        if r.offset is not None:
            if r.offset in seen:
                out.add(r.seq)
            seen.add(r.offset)
    return out


def _drop_repeats(steps: list[_Step], ref_repeats: set[int], cand_repeats: set[int]) -> int:
    """Unpaired repeats are the same data as a record already there: set aside, not listed
    as unpaired. Returns how many."""
    dropped = 0
    for step in steps:
        for free, repeats in ((step.free_ref, ref_repeats), (step.free_cand, cand_repeats)):
            for seq in [s for s in free if s in repeats]:
                del free[seq]
                dropped += 1
    return dropped


def _by_structure(ref: Dump, cand: Dump, steps: list[_Step], left_ref: Sequence[Record],
                  left_cand: Sequence[Record], read: Callable[[Dump, Record], np.ndarray], *,
                  need_values: bool) -> None:
    by_step = {s.number: s for s in steps}
    multi_ref: set[tuple[int, int]] = set()  # (step, ref seq) paired with several candidates
    for tp in pair_templates(ref, cand, left_ref, left_cand, read, need_values=need_values):
        for key, c in tp.cand.instances.items():
            r = tp.ref.instances.get(key)
            step = by_step.get(key[0])
            if r is None or step is None or c.seq not in step.free_cand:
                continue
            if r.seq not in step.free_ref and (key[0], r.seq) not in multi_ref:
                continue
            lay = tp.layout_for(r.shape, c.shape)
            pair = Pair(r, c, "structure", None, lay.ref_transform, lay.cand_transform,
                        tp.confidence, tp.evidence)
            shared_ref = lay.ref_transform is not None  # blocks share their reference
            shared_cand = "slice(" in (lay.cand_transform or "")  # a fused tensor covers several
            step.take(pair, keep_ref=shared_ref, keep_cand=shared_cand)
            if shared_ref:
                multi_ref.add((key[0], r.seq))
    for step in steps:  # references covered by blocks, and fused candidates, are paired
        paired_ref = {p.ref.seq for p in step.pairs}
        paired_cand = {p.cand.seq for p in step.pairs}
        for seq in list(step.free_ref):
            if seq in paired_ref:
                del step.free_ref[seq]
        for seq in list(step.free_cand):
            if seq in paired_cand:
                del step.free_cand[seq]
