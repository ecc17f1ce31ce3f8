"""Hidden states between layers: a layer whose output equals the previous layer's (a layer
skipped), and a layer whose output is far larger than the previous layer's (values that
explode)."""

from __future__ import annotations

import math

import numpy as np

from ..align.kinds import Kind
from .flags import RED, Checked, CheckResult, Flag, steps_text
from .tally import Tally
from .view import DumpView, Entry

__all__ = ["check_skipped", "check_explode", "JUMP", "FLOOR", "ABS_FLOOR"]

#: a layer output's magnitude at least JUMP times the previous layer's ...
JUMP = 100.0
#: ... and at least FLOOR times the embedding's (a layer recovering from tiny values is not
#: an explosion), or ABS_FLOOR where no embedding is recorded
FLOOR = 100.0
ABS_FLOOR = 1e3


def check_skipped(view: DumpView) -> CheckResult:
    tally = Tally()
    hits: dict[int, list[Entry]] = {}
    for step in view.steps:
        outs = view.layer_outputs(step)
        for layer, e in outs.items():
            prev = outs.get(layer - 1)
            if prev is not None and prev.record.shape == e.record.shape and \
                    tally.same(view, prev, e):
                hits.setdefault(layer, []).append(e)
    flags = []
    for layer, where in sorted(hits.items()):
        e = where[0]
        steps = tuple(w.step for w in where)
        flags.append(Flag("skipped_layer", RED, f"hidden states do not evolve: layer {layer}'s "
                          f"output {e.name} equals layer {layer - 1}'s at {steps_text(steps)} "
                          "(a skipped layer)", step=e.step, record=e.name, seq=e.record.seq,
                          steps=steps, figures={"layer": layer}))
    return CheckResult(tuple(flags), Checked(
        tally.seen, {"smallest_layer_difference": tally.smallest},
        "" if tally.seen else "no two consecutive layer outputs with data"))


def _magnitude(view: DumpView, e: Entry) -> float | None:
    """A typical position's size: the median over rows of each row's largest |value| (the
    finite ones), so that one position's massive activation (an attention sink: SmolLM2's
    first token reaches 2.5e4 from layer 11 on) does not count; from the stored abs_max
    when only statistics were kept and the step ran one token."""
    rows = view.rows(e)
    if rows is not None:
        if rows.size == 0:
            return None
        finite = np.where(np.isfinite(rows), np.abs(rows), np.nan)
        per_row = np.nanmax(finite, axis=1) if np.isfinite(finite).any(axis=1).all() else None
        return None if per_row is None else float(np.median(per_row))
    tokens = view.tokens(e.step)
    value = (e.record.stats or {}).get("abs_max")
    if tokens == 1 and isinstance(value, (int, float)) and math.isfinite(value):
        return float(value)
    return None


def check_explode(view: DumpView) -> CheckResult:
    """The first layer, at each step, whose output's magnitude jumps JUMP times over the
    previous layer's and passes the floor."""
    seen = 0
    worst = 0.0
    hits: list[tuple[Entry, float, float]] = []
    for step in view.steps:
        emb = view.first(step, Kind.EMBED)
        base = _magnitude(view, emb) if emb is not None else None
        floor = FLOOR * base if base else ABS_FLOOR
        prev: float | None = None  # layer 0 is not compared with the embedding
        for e in view.layer_outputs(step).values():
            m = _magnitude(view, e)
            if m is None:
                prev = None
                continue
            if prev:
                seen += 1
                ratio = m / prev
                if ratio >= JUMP and m >= floor:
                    hits.append((e, ratio, m))
                    break
                worst = max(worst, ratio)
            prev = m
    flags = []
    if hits:
        e, ratio, m = hits[0]
        steps = tuple(h.step for h, _, _ in hits)
        flags.append(Flag("explode", RED, f"values explode: {e.name} (layer {e.layer}) is "
                          f"{ratio:.4g} times the previous layer's output (a typical position's "
                          f"largest |value| {m:.4g}) at {steps_text(steps)}", step=e.step,
                          record=e.name, seq=e.record.seq, steps=steps,
                          figures={"ratio": ratio, "magnitude": m, "layer": e.layer}))
    return CheckResult(tuple(flags), Checked(
        seen, {"largest_layer_ratio": worst if seen else None},
        "" if seen else "no two consecutive layer outputs with data"))
