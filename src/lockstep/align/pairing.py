"""Pairing the records of two dumps, step by step.

Four passes per step, each on what the previous left: the same name (and call index); the
same canonical name through each side's name table (align.tables), with the layout transform
the table names; the same name after normalisation (wrapper prefixes such as ``module.`` or
``_orig_mod.`` dropped, case folded); then, unless name tables paired the two dumps, capture
order among records of the same shape (size-1 dims ignored).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Sequence

from ..store.reader import Dump, Record
from .tables import NameTable, detect_table

__all__ = ["Pair", "Alignment", "align", "squeeze_shape", "normalize_name"]

_WRAPPER_PREFIXES = re.compile(r"^(?:(?:module|_orig_mod|base_model\.model|_fsdp_wrapped_module)\.)+")


def squeeze_shape(shape: Sequence[int]) -> tuple[int, ...]:
    """The shape without its size-1 dims: ``(1, 7, 64)`` and ``(7, 64)`` are the same."""
    return tuple(n for n in shape if n != 1)


def normalize_name(name: str) -> str:
    """A name with wrapper prefixes removed and case folded, for the second pairing pass."""
    return _WRAPPER_PREFIXES.sub("", name).lower()


@dataclass(frozen=True)
class Pair:
    """A reference record and the candidate record it is compared with."""

    ref: Record
    cand: Record
    how: str  #: "name", "table", "normalized" or "order": which pass paired them
    canonical: str | None = None  #: the canonical name, when a name table paired them
    ref_transform: str | None = None  #: layout transform applied to the reference tensor
    cand_transform: str | None = None  #: and to the candidate tensor


@dataclass(frozen=True)
class Alignment:
    """Every pair, in the reference's capture order, and what could not be paired."""

    pairs: tuple[Pair, ...]
    ref_only: tuple[Record, ...]
    cand_only: tuple[Record, ...]


def _table_pass(left: list[Record], free_cand: dict[int, Record], pairs: dict[int, Pair],
                tables: tuple[NameTable, NameTable]) -> list[Record]:
    ref_table, cand_table = tables
    by_canon: dict[tuple[str, int], tuple[Record, str | None]] = {}
    for c in free_cand.values():
        hit = cand_table.lookup(c.name)
        if hit is not None:
            by_canon.setdefault((hit[0], c.call), (c, hit[1]))
    still: list[Record] = []
    for r in left:
        hit = ref_table.lookup(r.name)
        found = by_canon.pop((hit[0], r.call), None) if hit is not None else None
        if hit is None or found is None:
            still.append(r)
            continue
        c, cand_transform = found
        pairs[r.seq] = Pair(r, c, "table", hit[0], hit[1], cand_transform)
        del free_cand[c.seq]
    return still


def _align_step(ref: list[Record], cand: list[Record],
                tables: tuple[NameTable, NameTable] | None) -> tuple[list[Pair], list[Record],
                                                                      list[Record]]:
    pairs: dict[int, Pair] = {}  # by ref seq
    by_name = {(r.name, r.call): r for r in cand}
    free_cand = {r.seq: r for r in cand}
    left: list[Record] = []
    for r in ref:
        c = by_name.get((r.name, r.call))
        if c is not None:
            pairs[r.seq] = Pair(r, c, "name")
            del free_cand[c.seq]
        else:
            left.append(r)
    if left and free_cand and tables is not None:
        left = _table_pass(left, free_cand, pairs, tables)
    if left and free_cand:
        by_norm: dict[tuple[str, int], Record] = {}
        for c in free_cand.values():
            by_norm.setdefault((normalize_name(c.name), c.call), c)
        still: list[Record] = []
        for r in left:
            c = by_norm.pop((normalize_name(r.name), r.call), None)
            if c is not None:
                pairs[r.seq] = Pair(r, c, "normalized")
                del free_cand[c.seq]
            else:
                still.append(r)
        left = still
    if left and free_cand and tables is None:
        # order-preserving: a leftover candidate may only pair after the previous order pair.
        # Not when name tables paired the two: what they leave has no counterpart by design.
        rest = sorted(free_cand.values(), key=lambda c: c.seq)
        start = 0
        still = []
        for r in left:
            shape = squeeze_shape(r.shape)
            for i in range(start, len(rest)):
                if squeeze_shape(rest[i].shape) == shape:
                    pairs[r.seq] = Pair(r, rest[i], "order")
                    del free_cand[rest[i].seq]
                    start = i + 1
                    break
            else:
                still.append(r)
        left = still
    ordered = [pairs[r.seq] for r in ref if r.seq in pairs]
    return ordered, left, sorted(free_cand.values(), key=lambda c: c.seq)


def align(ref: Dump, cand: Dump, *, use_tables: bool = True) -> Alignment:
    """Pair the two dumps' records, step by step, in the reference's capture order.

    ``use_tables=False`` leaves out the name-table pass."""
    tables = None
    if use_tables:
        ref_table = detect_table(r.name for r in ref.records)
        cand_table = detect_table(c.name for c in cand.records)
        if ref_table is not None and cand_table is not None:
            tables = (ref_table, cand_table)
    ref_steps: dict[int, list[Record]] = {}
    cand_steps: dict[int, list[Record]] = {}
    for r in ref.records:
        ref_steps.setdefault(r.step, []).append(r)
    for c in cand.records:
        cand_steps.setdefault(c.step, []).append(c)
    pairs: list[Pair] = []
    ref_only: list[Record] = []
    cand_only: list[Record] = []
    for step in sorted(set(ref_steps) | set(cand_steps)):
        step_pairs, step_ref_only, step_cand_only = _align_step(
            ref_steps.get(step, []), cand_steps.get(step, []), tables)
        pairs += step_pairs
        ref_only += step_ref_only
        cand_only += step_cand_only
    return Alignment(tuple(pairs), tuple(ref_only), tuple(cand_only))
