"""Steps cut along their token dim: the dim of a record whose size is the tokens its step
was fed, and a view of a dump with some steps cut to a range of those tokens (a prefill's
tokens after a cached prefix, align.prefix; a decode step's rows without its rejected drafts,
align.drafts)."""

from __future__ import annotations

import math
from dataclasses import replace
from typing import Sequence

from ..display import safe
from ..store.reader import Dump, Record
from .composed import ComposedDump, Parts
from .steps import Fed, fed_per_step

__all__ = ["token_dim", "token_dim_across", "cut_steps", "not_cut_lines", "not_cut_dicts"]


def token_dim(shapes: Sequence[tuple[int, ...]], counts: Sequence[int]) -> int | str | None:
    """The dim whose size in every part's record is the tokens that part was fed, the other
    dims the same; None when no dim is, and why when several are and they are not all of
    size 1 (a (1, 4, T, 64) record fed 4 tokens: heads or tokens?)."""
    nd = len(shapes[0])
    if any(len(s) != nd for s in shapes):
        return None
    fits = [d for d in range(nd) if all(s[d] == n for s, n in zip(shapes, counts)) and
            all(s[:d] + s[d + 1:] == shapes[0][:d] + shapes[0][d + 1:] for s in shapes)]
    if len(fits) > 1 and any(n != 1 for n in counts):  # (size-1 dims are one order)
        return (f"dims {fits} of its shape {list(shapes[0])} all have the size of the tokens "
                "fed: which holds the tokens is not known")
    return fits[0] if fits else None


def token_dim_across(dump: Dump, name: str, fed: dict[int, Fed]) -> int | str | None:
    """The token dim of ``name``'s records across the dump's steps, each fed its own count
    of tokens (steps fed different counts tell apart dims one step cannot)."""
    known = [(r.shape, len(fed[r.step][0] or ())) for r in dump.records
             if r.name == name and fed.get(r.step, (None, None))[0] is not None]
    return token_dim([s for s, _ in known], [n for _, n in known]) if known else None


def not_cut_lines(left_out: Sequence[tuple[str, str]], step: int) -> list[str]:
    """The records of a cut step that could not be cut, one line each for the report."""
    return [f"not cut, so not compared: {safe(name or '(root)')}@{step}: {why}"
            for name, why in left_out]


def not_cut_dicts(left_out: Sequence[tuple[str, str]]) -> list[dict[str, str]]:
    """The same for the JSON report."""
    return [{"name": n, "why": w} for n, w in left_out]


def cut_steps(dump: Dump, cuts: dict[int, tuple[int, int, int]], note: str,
              whole: dict[str, tuple[int, ...]] | None = None, others: str | None = None
              ) -> tuple[ComposedDump, dict[int, tuple[tuple[str, str], ...]]]:
    """``dump`` with each step of ``cuts`` (step -> (tokens it fed, start, stop)) cut to its
    tokens ``start`` to ``stop`` along each record's token dim; records with no such dim kept
    whole (or, with ``others``, left out for that reason), and so is a record whose name and
    shape are in ``whole`` (the other side's, holding every token). Each cut record's extra
    gets ``note: [start, stop]``. Returns the view and, per step, (name, why) of the records
    that could not be cut (left out)."""
    whole = whole or {}
    records: list[Record] = []
    parts: dict[int, Parts] = {}
    left: dict[int, list[tuple[str, str]]] = {s: [] for s in cuts}
    across: dict[str, int | str | None] = {}  # a name's token dim, told by all its steps
    fed: dict[int, Fed] | None = None
    for r in dump.records:
        cut = cuts.get(r.step)
        d = token_dim([r.shape], [cut[0]]) if cut is not None and \
            whole.get(r.name) != r.shape else None
        if isinstance(d, str) and cut is not None:  # (2, 2, 32) fed 2: other steps may tell
            if r.name not in across:
                fed = fed if fed is not None else fed_per_step(dump)
                across[r.name] = token_dim_across(dump, r.name, fed)
            told = across[r.name]
            d = told if isinstance(told, int) and r.shape[told] == cut[0] else d
        if d is None and cut is not None and others is not None:
            left[r.step].append((r.name, others))
            continue
        if d is None:
            records.append(r)
            parts[r.seq] = Parts("one", ((dump, r),))
            continue
        assert cut is not None
        if isinstance(d, str):
            left[r.step].append((r.name, d))
            continue
        if not r.has_data:
            left[r.step].append((r.name, "recorded as statistics only: its tokens cannot be "
                                 "cut"))
            continue
        _, start, stop = cut
        shape = list(r.shape)
        shape[d] = stop - start
        itemsize = (r.nbytes or 0) // max(1, r.numel)
        part = Parts("slice", ((dump, r),), dim=d, start=start, stop=stop)
        records.append(replace(r, shape=tuple(shape), offset=part.offset, stats=None,
                               nbytes=math.prod(shape) * itemsize,
                               extra={**r.extra, note: [start, stop]}))
        parts[r.seq] = part
    view = ComposedDump(dump.path, dump.header, records, dict(dump.meta), dump.end, parts,
                        [dump])
    return view, {s: tuple(x) for s, x in left.items()}
