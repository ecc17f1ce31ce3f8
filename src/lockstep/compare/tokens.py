"""The tokens: what each side chose, and whether a greedy candidate chose the argmax of its own
logits.

Engines record the tokens they were fed as ``input_ids`` records (compared like any tensor)
and the tokens they chose as ``generated_token_ids`` in the dump's metadata (docs/format.md).
Two facts decide the verdict beside the tensors: a greedy candidate whose chosen token is not
the argmax of its own logits at that step has a broken logits-to-token step (``diverged``, a
``sampling`` diagnosis), and chosen tokens that differ between the two sides while every
tensor matches are never a match.
"""

from __future__ import annotations

from typing import Any, Mapping

import numpy as np

from ..align.kinds import Kind as K
from ..store.reader import Dump, Record
from .case import is_logits, role_of_name
from .token_check import OffArgmax, TokenCheck

__all__ = ["check_tokens", "chosen_tokens"]

#: a chosen token whose logit is this close to the maximum (relative) is a tie, not a bug
_TIE = 1e-6


def chosen_tokens(meta: Mapping[str, Any]) -> tuple[int, ...] | None:
    """The ``generated_token_ids`` of a run's metadata, when it holds a list of ints."""
    ids = meta.get("generated_token_ids")
    if not isinstance(ids, (list, tuple)) or not all(
            isinstance(t, int) and not isinstance(t, bool) for t in ids):
        return None
    return tuple(ids)


def _greedy(meta: Mapping[str, Any]) -> bool:
    """The run decoded greedily (no temperature above 0, no sampling switched on)."""
    temperature = meta.get("temperature")
    if isinstance(temperature, (int, float)) and temperature > 0:
        return False
    return not meta.get("do_sample")


def _logits_record(dump: Dump, step: int) -> Record | None:
    for rec in dump.in_step(step):
        if rec.has_data and rec.shape and (is_logits(rec, dump.meta)
                                           or role_of_name(rec.name).op == K.LOGITS):
            return rec
    return None


def _off_argmax(dump: Dump, step: int, chosen: int) -> OffArgmax | None:
    rec = _logits_record(dump, step)
    if rec is None:
        return None
    values = dump.read(rec)  # (the last row alone in float64: a long prompt's logits are GBs)
    row = np.asarray(values.reshape(-1, rec.shape[-1])[-1], dtype=np.float64)
    dump.release(rec)
    if row.size == 0:
        return None
    nan = np.isnan(row)
    row = np.where(nan, -np.inf, row)
    best = int(np.argmax(row))
    if not 0 <= chosen < row.size:
        return OffArgmax(step, chosen, best, float("inf"), rec.name)
    if nan[chosen]:  # no gap to measure: the chosen token's own logit is NaN
        return OffArgmax(step, chosen, best, float("nan"), rec.name)
    gap = float(row[best] - row[chosen])
    if gap <= _TIE * max(1.0, abs(float(row[best]))):
        return None
    return OffArgmax(step, chosen, best, gap, rec.name)


def check_tokens(ref: Dump, cand: Dump) -> TokenCheck:
    """The tokens of the two runs (see the module docstring)."""
    ref_tokens, cand_tokens = chosen_tokens(ref.meta), chosen_tokens(cand.meta)
    split = None
    if ref_tokens is not None and cand_tokens is not None:
        split = next((i for i, (a, b) in enumerate(zip(ref_tokens, cand_tokens)) if a != b),
                     None)
    off: list[OffArgmax] = []
    if cand_tokens is not None and _greedy(cand.meta):
        steps = set(cand.steps)
        for step, token in enumerate(cand_tokens):
            found = _off_argmax(cand, step, token) if step in steps else None
            if found is not None:
                off.append(found)
    return TokenCheck(ref_tokens, cand_tokens, split, tuple(off))
