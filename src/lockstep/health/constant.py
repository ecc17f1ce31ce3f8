"""Activations that are all zeros or one constant value: weights never loaded, a buffer
never written."""

from __future__ import annotations

import math

import numpy as np

from ..align.kinds import Kind
from .flags import RED, Checked, CheckResult, Flag, steps_text
from .view import DumpView, Entry

__all__ = ["check_constant", "MIN_ELEMENTS", "ACTIVATIONS"]

#: fewer elements than this can be constant by chance (a one-head, one-token scalar)
MIN_ELEMENTS = 16
#: the ops whose values are activations that a healthy model never holds constant
ACTIVATIONS = frozenset({
    Kind.EMBED, Kind.ATTN_NORM, Kind.QKV, Kind.Q, Kind.K, Kind.V, Kind.Q_NORM, Kind.K_NORM,
    Kind.Q_ROPE, Kind.K_ROPE, Kind.ATTN, Kind.ATTN_HEADS, Kind.ATTN_OUT, Kind.ATTN_RESIDUAL,
    Kind.MLP_NORM, Kind.GATE_UP, Kind.GATE, Kind.UP, Kind.GATE_ACT, Kind.ACT, Kind.DOWN,
    Kind.MLP_OUT, Kind.OUT, Kind.FINAL_NORM, Kind.LOGITS})
_OUTSIDE_LAYERS = {Kind.EMBED, Kind.FINAL_NORM, Kind.LOGITS}


def _candidates(view: DumpView, step: int) -> list[Entry]:
    """The step's activations: records of a known op (in a layer, for a layer's op) and the
    layer outputs found by structure."""
    found = {e.record.seq: e for e in view.in_step(step)
             if e.is_float and e.op in ACTIVATIONS
             and (e.layer is not None or e.op in _OUTSIDE_LAYERS)}
    for e in view.layer_outputs(step).values():
        found.setdefault(e.record.seq, e)
    return [found[s] for s in sorted(found)]


def _min_max(view: DumpView, e: Entry) -> tuple[float, float] | None:
    v = view.values(e)
    if v is not None:
        if v.size == 0 or not bool(np.isfinite(v).all()):
            return None
        return float(v.min()), float(v.max())
    return view.stored_range(e)


def check_constant(view: DumpView) -> CheckResult:
    """A float activation of at least MIN_ELEMENTS elements whose every element is 0, or the
    same value (min == max): one flag per record name, with every step where it was."""
    seen = 0
    smallest_spread = math.inf
    hits: dict[str, list[tuple[Entry, float]]] = {}
    for step in view.steps:
        for e in _candidates(view, step):
            if e.record.numel < MIN_ELEMENTS:
                continue
            mm = _min_max(view, e)
            if mm is None:
                continue
            seen += 1
            lo, hi = mm
            spread = (hi - lo) / max(abs(hi), abs(lo), 1e-30)
            if lo == hi:
                hits.setdefault(e.name, []).append((e, lo))
            else:
                smallest_spread = min(smallest_spread, spread)
    flags = []
    for name, where in hits.items():
        e, value = where[0]
        steps = tuple(w.step for w, _ in where)
        what = "all zeros" if value == 0 else f"every element {value:.6g}"
        flags.append(Flag("constant", RED, f"{name} ({e.op or 'layer output'}"
                          f"{'' if e.layer is None else f', layer {e.layer}'}) is {what} "
                          f"({e.record.numel} elements) at {steps_text(steps)}",
                          step=e.step, record=name, seq=e.record.seq, steps=steps,
                          figures={"value": value, "elements": e.record.numel}))
    flags.sort(key=lambda f: f.seq if f.seq is not None else 0)
    figures = {"smallest_relative_spread": None if math.isinf(smallest_spread)
               else smallest_spread, "constant_records": sum(len(w) for w in hits.values())}
    return CheckResult(tuple(flags), Checked(seen, figures))

