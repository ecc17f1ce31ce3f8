"""Splitting a batched dump into one dump per sequence, each laid out as a one-prompt run of
that sequence: its rows of every record, padding left out, its steps counted from its own
prefill. The split dumps carry what the batch diagnosis reads (``batch_sequence``): each
step's row, padding and KV slots, and the slots every sequence wrote."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from ..store.reader import open_dump
from ..store.writer import DumpWriter
from .infer import REQUEST_KEY, BatchRequest, check_declared, infer_layout
from .layout import CU_SEQLENS, BatchLayout

__all__ = ["split_batch", "layout_of"]


def _sequence_meta(meta: dict[str, Any], layout: BatchLayout, i: int,
                   paths: Sequence[Path], references: Sequence[str] | None,
                   written: dict[str, list[int]]) -> dict[str, Any]:
    steps = []
    for st, seg, position in layout.positions(i):
        steps.append({"batch_step": st.step, "row": seg.row, "rows": [s.sequence for s in
                                                                      st.segments],
                      "width": st.width, "start": seg.start, "length": seg.length,
                      "widest": st.widest, "position": position, "write": list(seg.write),
                      "read": list(seg.read), "packed": st.packed,
                      "moved": list(seg.moved), "padding_after": st.padding_after,
                      "drafts": seg.drafts, "rejected": seg.rejected})
    out = {k: v for k, v in meta.items() if k not in ("batch", REQUEST_KEY)}
    out.update(prompt_token_ids=list(layout.prompts[i]), decode=max(len(steps) - 1, 0),
               batch_sequence={"sequence": i, "sequences": len(layout.prompts),
                               "padding": layout.padding, "join_at": list(layout.join_at),
                               "steps": steps, "written": written,
                               "candidates": [str(p) for p in paths],
                               "references": list(references or [])})
    if i < len(layout.tokens):
        out["generated_token_ids"] = list(layout.tokens[i])
    return out


def layout_of(dump: Any) -> BatchLayout:
    """The batch layout of a batched dump: the one its engine wrote (``batch.steps``),
    checked against the ids each step was fed, or else the one those ids and positions
    show (``batching.infer``)."""
    meta = dict(dump.meta)
    req = BatchRequest.from_meta(meta)
    declared = meta.get("batch")
    if req is not None and not (isinstance(declared, dict) and declared.get("steps")):
        return infer_layout(dump, req)
    cu = {t: [int(x) for x in np.asarray(dump.raw(r)).reshape(-1)] for t in dump.steps
          for r in dump.in_step(t) if r.name == CU_SEQLENS and r.has_data}
    layout = BatchLayout.from_meta(meta, cu)
    check_declared(dump, layout, req)
    return layout


def split_batch(batched: str | os.PathLike[str], out_dir: str | os.PathLike[str], *,
                references: Sequence[str] | None = None, overwrite: bool = True,
                name: str = "candidate", layout: BatchLayout | None = None) -> list[Path]:
    """Write ``out_dir``/``name``-I.lsd for each sequence I of the batched dump; returns the
    paths. ``references``: each sequence's solo reference dump (the diagnosis reads the
    others' tokens); ``layout``: the dump's layout, where the caller found it already."""
    out_dir = Path(out_dir)
    with open_dump(batched) as dump:
        layout = layout or layout_of(dump)
        paths = [out_dir / f"{name}-{i}.lsd" for i in range(len(layout.prompts))]
        slots = {str(j): sorted({s for _, seg in layout.of(j) for s in seg.write})
                 for j in range(len(layout.prompts))}  # the KV slots each sequence wrote
        writers = [DumpWriter(p, _sequence_meta(dict(dump.meta), layout, i, paths, references,
                                                slots), overwrite=overwrite)
                   for i, p in enumerate(paths)]
        own_step = {(st.step, seg.sequence): k for i in range(len(paths))
                    for k, (st, seg) in enumerate(layout.of(i))}
        written: dict[tuple[int, int | None, int | None], int | None] = {}
        try:
            for st in layout.steps:
                for rec in dump.in_step(st.step):
                    if rec.name == CU_SEQLENS or not rec.has_data:
                        continue
                    raw = np.asarray(dump.raw(rec))
                    for seg in st.segments:
                        part = st.piece(raw, seg)
                        part = np.ascontiguousarray(raw if part is None else part)
                        w = writers[seg.sequence]
                        # the same tensor under a second name (a module returning its
                        # child's output) stays one tensor: pairing reads repeats by offset
                        key = (seg.sequence, rec.offset, rec.nbytes)
                        same = written.get(key)
                        w.write(rec.name, own_step[st.step, seg.sequence], rec.dtype,
                                tuple(part.shape), None if same is not None else part.data,
                                call=rec.call, at=same, **rec.extra)
                        written.setdefault(key, w.last_offset)
                    dump.release(rec)
        finally:
            for w in writers:
                w.close()
    return paths
