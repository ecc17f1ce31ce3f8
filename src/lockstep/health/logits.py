"""The logits: flat (a tiny spread: the model predicts nothing), and, as information, the
same top token at every decode step (repetition)."""

from __future__ import annotations

import math

import numpy as np

from ..align.kinds import Kind
from .flags import INFO, RED, Checked, CheckResult, Flag, steps_text
from .view import DumpView, Entry

__all__ = ["check_logits", "FLAT_SPREAD"]

#: a last row whose max - min is below this (and above 0: all equal is the constant check's)
FLAT_SPREAD = 1e-3


def _last_row(view: DumpView, e: Entry) -> np.ndarray | None:
    rows = view.rows(e)
    if rows is None or rows.shape[0] == 0 or not np.isfinite(rows[-1]).all():
        return None
    return rows[-1]


def _spread(view: DumpView, e: Entry, row: np.ndarray | None) -> float | None:
    if row is not None:
        return float(row.max() - row.min())
    one_row = e.record.shape and e.record.numel == e.record.shape[-1]
    stored = view.stored_range(e) if one_row else None
    return None if stored is None else stored[1] - stored[0]


def check_logits(view: DumpView) -> CheckResult:
    seen = 0
    least = math.inf
    flat: list[tuple[Entry, float]] = []
    top: dict[int, int] = {}
    for step in view.steps:
        e = view.first(step, Kind.LOGITS)
        if e is None:
            continue
        row = _last_row(view, e)
        spread = _spread(view, e, row)
        if spread is None:
            continue
        seen += 1
        if 0 < spread < FLAT_SPREAD:
            flat.append((e, spread))
        elif spread > 0:
            least = min(least, spread)
        if row is not None and step > 0:
            top[step] = int(row.argmax())
    flags = []
    if flat:
        e, spread = flat[0]
        steps = tuple(f.step for f, _ in flat)
        flags.append(Flag("flat_logits", RED, f"the logits are flat: {e.name}'s largest minus "
                          f"smallest is {spread:.3g} at {steps_text(steps)} (below "
                          f"{FLAT_SPREAD}): the model predicts nothing", step=e.step,
                          record=e.name, seq=e.record.seq, steps=steps,
                          figures={"spread": spread}))
    if len(top) >= 2 and len(set(top.values())) == 1:
        token = next(iter(top.values()))
        fed = [view.fed(s) for s in sorted(top)]
        fed_ids = [f[-1] for f in fed if f]
        changing = len(set(fed_ids)) > 1
        how = (f"while the tokens fed changed ({fed_ids[:8]})" if changing else
               "each one fed back (a repetition loop)" if fed_ids else "")
        first = min(top)
        e = view.first(first, Kind.LOGITS)
        flags.append(Flag("repetition", INFO, f"the top token is {token} at every decode step "
                          f"({steps_text(sorted(top))}) {how}".rstrip(), step=first,
                          record=e.name if e else None, seq=e.record.seq if e else None,
                          steps=tuple(sorted(top)),
                          figures={"token": token, "fed": fed_ids, "fed_changed": changing}))
    return CheckResult(tuple(flags), Checked(
        seen, {"smallest_spread": None if math.isinf(least) else least,
               "decode_top_tokens": [top[s] for s in sorted(top)]},
        "" if seen else "no logits recorded"))
