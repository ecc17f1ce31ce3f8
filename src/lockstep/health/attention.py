"""Attention probabilities: rows that do not sum to 1, every row one uniform distribution,
and every query of every decode step putting nearly all its weight on one and the same key
(a cache that serves one position)."""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from .flags import RED, Checked, CheckResult, Flag, steps_text
from .probs import attention_probs, probs_rows
from .view import DumpView, Entry

__all__ = ["check_attention", "SUM_TOLERANCE", "SUM_TOLERANCE_16BIT", "UNIFORM_RATIO",
           "SAME_KEY_WEIGHT"]

SUM_TOLERANCE = 1e-3  #: |row sum - 1| allowed (float32/float64 storage)
SUM_TOLERANCE_16BIT = 1e-2  #: for float16/bfloat16 storage
UNIFORM_RATIO = 1 + 1e-4  #: a row whose largest weight over its smallest nonzero one is below
SAME_KEY_WEIGHT = 0.98  #: "nearly all": the weight every query puts on the one key


def _sum_tolerance(e: Entry) -> float:
    return SUM_TOLERANCE if e.record.dtype in ("float32", "float64") else SUM_TOLERANCE_16BIT


def _uniform(rows: np.ndarray) -> tuple[bool, float]:
    """(every row with two or more nonzero weights is uniform over them, and there is such a
    row; the largest max/min ratio of those rows)."""
    worst = 1.0
    many = False
    for row in rows:
        nz = row[row > 0]
        if nz.size < 2:
            continue
        many = True
        worst = max(worst, float(nz.max() / nz.min()))
        if worst > UNIFORM_RATIO:
            return False, worst
    return many, worst


class _Group:
    """The records where one symptom was seen."""

    def __init__(self) -> None:
        self.where: list[Entry] = []
        self.figure = 0.0

    def add(self, e: Entry, figure: float) -> None:
        self.where.append(e)
        self.figure = max(self.figure, figure)

    def flag(self, check: str, message: str, figures: dict[str, Any]) -> Flag:
        e = self.where[0]
        steps = tuple(sorted({w.step for w in self.where}))
        layers = sorted({w.layer for w in self.where if w.layer is not None})
        return Flag(check, RED, f"{message} in {len(self.where)} records ({_layers(layers)}"
                    f"{steps_text(steps)}), first {e.name} at step {e.step}",
                    step=e.step, record=e.name, seq=e.record.seq, steps=steps,
                    figures={**figures, "layers": layers, "records": len(self.where)})


def _layers(layers: list[int]) -> str:
    if not layers:
        return ""
    shown = ", ".join(map(str, layers[:12])) + (" ..." if len(layers) > 12 else "")
    return f"layer{'s' if len(layers) > 1 else ''} {shown}; "


def check_attention(view: DumpView) -> CheckResult:
    sums, uniform = _Group(), _Group()
    seen = 0
    worst_sum, least_uniform_ratio = 0.0, math.inf
    # per layer (or record name): at each decode step, (the shared key, the least weight)
    decode: dict[Any, list[tuple[int, int | None, float, Entry]]] = {}
    for step in view.steps:
        for e in attention_probs(view, step):
            rows = probs_rows(view, e)
            if rows is None:
                continue
            seen += 1
            err = float(np.abs(rows.sum(axis=1) - 1).max())
            worst_sum = max(worst_sum, err)
            if err > _sum_tolerance(e):
                sums.add(e, err)
            is_uniform, ratio = _uniform(rows)
            if is_uniform:
                uniform.add(e, ratio)
            else:
                least_uniform_ratio = min(least_uniform_ratio, ratio)
            if step > 0:
                top = rows.argmax(axis=1)
                key = int(top[0]) if (top == top[0]).all() else None
                decode.setdefault(e.layer if e.layer is not None else e.name, []).append(
                    (step, key, float(rows.max(axis=1).min()), e))
    flags = []
    if sums.where:
        flags.append(sums.flag("attention_sum", "attention rows do not sum to 1 (largest "
                               f"|sum - 1| {sums.figure:.4g})", {"max_error": sums.figure}))
    if uniform.where:
        flags.append(uniform.flag("attention_uniform", "every attention row is the same "
                                  "uniform distribution over its keys (all weights identical)",
                                  {"max_ratio": uniform.figure}))
    same, most_on_one_key = _Group(), 0.0
    same_key, same_least = -1, 1.0
    for runs in decode.values():
        if len({s for s, *_ in runs}) < 2:
            continue  # one decode step says nothing about "always"
        keys = {k for _, k, _, _ in runs}
        least = min(w for _, _, w, _ in runs)
        if len(keys) != 1 or None in keys:
            continue
        if least < SAME_KEY_WEIGHT:
            most_on_one_key = max(most_on_one_key, least)
            continue
        for *_, e in runs:
            same.add(e, least)
        same_key = same_key if same_key >= 0 else int(next(iter(keys)) or 0)
        same_least = min(same_least, least)
    if same.where:
        flags.append(same.flag("attention_same_key", "every query puts nearly all its weight "
                               f"(at least {same_least:.4g}) on the same key (key {same_key}) "
                               "at every decode step: the KV cache serves one position",
                               {"least_weight": same_least, "key": same_key}))
    figures = {"max_row_sum_error": worst_sum if seen else None,
               "least_uniform_ratio": None if math.isinf(least_uniform_ratio)
               else least_uniform_ratio,
               "max_weight_all_queries_on_one_key": most_on_one_key if seen else None}
    return CheckResult(tuple(flags), Checked(
        seen, figures, "" if seen else "no attention probabilities recorded"))
