"""Finding attention probabilities in a dump: by name (a table's ``attn_probs``, llama.cpp's
``kq_soft_max-N``, names such as ``att_p``, ``attn_weights``, ``probs``), else by values: a
float tensor whose last dimension is the keys (every position so far), its values in
[0, 1]."""

from __future__ import annotations

import re

import numpy as np

from ..align.kinds import Kind
from .view import DumpView, Entry

__all__ = ["attention_probs", "probs_rows"]

_NAMED = re.compile(r"soft_?max|att(?:n|ention)?_?(?:p|probs?|weights?)$|(?:^|[._:-])probs?$",
                    re.I)
_TOLERANCE = 1e-3  # above 1 by more than rounding: not a probability


def _named(e: Entry) -> bool:
    return e.op == Kind.ATTN_PROBS or bool(_NAMED.search(e.name))


def _by_values(view: DumpView, e: Entry) -> bool:
    """Unnamed, no known op, and shaped and valued like probabilities over the keys."""
    shape = e.record.shape
    keys = view.keys(e.step)
    if e.op or len(shape) < 2 or keys is None or shape[-1] != keys or keys < 2 \
            or "mask" in e.name.lower():
        return False
    tokens = view.tokens(e.step)
    if tokens and (e.record.numel // shape[-1]) % tokens:
        return False
    rows = view.rows(e)
    if rows is None or not np.isfinite(rows).all():
        return False
    # weights strictly between 0 and 1 somewhere: a mask of 0s and 1s is not probabilities
    return bool(rows.min() >= 0 and rows.max() <= 1 + _TOLERANCE and (rows.max(1) > 0).all()
                and ((rows > 0) & (rows < 1)).any())


def attention_probs(view: DumpView, step: int) -> list[Entry]:
    """The step's attention probability records that hold data, in capture order."""
    return [e for e in view.in_step(step) if e.is_float and e.record.has_data
            and e.record.numel > 0 and (_named(e) or _by_values(view, e))]


def probs_rows(view: DumpView, e: Entry) -> np.ndarray | None:
    """The record as rows over the keys, or None when it holds NaN/Inf (the NaN check's)."""
    rows = view.rows(e)
    if rows is None or not np.isfinite(rows).all():
        return None
    return rows
