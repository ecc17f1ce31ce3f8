"""RoPE not applied: q (or k) after RoPE holding the same values as before it, at a step
with positions past 0 (where RoPE rotates)."""

from __future__ import annotations

import numpy as np

from ..align.kinds import Kind
from .flags import RED, Checked, CheckResult, Flag, steps_text
from .tally import Tally
from .view import DumpView, Entry

__all__ = ["check_rope"]

#: the record RoPE rotates, for each rotated op: its input (after a q/k norm where there is one)
_INPUTS = {Kind.Q_ROPE: (Kind.Q_NORM, Kind.Q), Kind.K_ROPE: (Kind.K_NORM, Kind.K)}


def _before(view: DumpView, e: Entry) -> np.ndarray | None:
    """The values RoPE rotated into ``e``: the q (k) record before it, else q's (k's) columns
    of the layer's fused qkv projection (vLLM's and SGLang's ``qkv_proj``: q, then k, then
    v, per token; as wide as the q (k) after RoPE)."""
    for op in _INPUTS[Kind(e.op)]:
        found = view.first(e.step, op, e.layer)
        if found is not None:
            return view.values(found) if found.record.numel == e.record.numel else None
    qkv = view.first(e.step, Kind.QKV, e.layer)
    rows = view.rows(qkv) if qkv is not None else None
    if rows is None or not rows.shape[0] or e.record.numel % rows.shape[0]:
        return None
    start = 0
    if e.op == Kind.K_ROPE:  # after q's columns: as many as the layer's q after RoPE holds
        q = view.first(e.step, Kind.Q_ROPE, e.layer)
        if q is None or q.record.numel % rows.shape[0]:
            return None
        start = q.record.numel // rows.shape[0]
    width = e.record.numel // rows.shape[0]
    return rows[:, start:start + width] if start + width <= rows.shape[1] else None


def _distance(a: np.ndarray, b: np.ndarray) -> float:
    """How far apart the values are whatever the layout: the sorted values compared (RoPE
    at a position past 0 changes the values, a layout change only moves them)."""
    scale = max(float(np.abs(a).max()), float(np.abs(b).max()), 1e-30)
    return float(np.abs(np.sort(a, axis=None) - np.sort(b, axis=None)).max()) / scale


def check_rope(view: DumpView) -> CheckResult:
    tally = Tally()
    hits: list[Entry] = []
    for step in view.steps:
        past_zero = step > 0 or (view.tokens(step) or 0) > 1
        if not past_zero:
            continue
        for e in view.in_step(step):
            if e.op not in _INPUTS or e.layer is None:
                continue
            a, b = _before(view, e), view.values(e)
            if a is None or b is None or a.size == 0 or not (
                    np.isfinite(a).all() and np.isfinite(b).all()) or not np.abs(a).max() > 0:
                continue  # NaN and all-zero q/k are other checks' flags
            if tally.add(_distance(a, b)):
                hits.append(e)
    flags = []
    if hits:
        e = hits[0]
        steps = tuple(sorted({h.step for h in hits}))
        layers = sorted({h.layer for h in hits if h.layer is not None})
        flags.append(Flag("rope", RED, f"RoPE does not change q/k: {len(hits)} records after "
                          "RoPE hold the values before it at positions past 0 (layers "
                          f"{', '.join(map(str, layers[:12]))}; {steps_text(steps)}), first "
                          f"{e.name} at step {e.step}", step=e.step, record=e.name,
                          seq=e.record.seq, steps=steps,
                          figures={"layers": layers, "records": len(hits)}))
    return CheckResult(tuple(flags), Checked(
        tally.seen, {"smallest_change": tally.smallest},
        "" if tally.seen else "no q/k recorded both before and after RoPE with data"))
