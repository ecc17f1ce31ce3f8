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
from ..align.roles import role_of_name
from ..align.steps import fed_per_step, prompt_length
from ..store.reader import Dump, Record
from .case import is_logits
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


def _rows(dump: Dump, rec: Record) -> np.ndarray:
    values = dump.read(rec)
    return values.reshape(-1, rec.shape[-1])


def _off_argmax(row_values: np.ndarray, step: int, chosen: int,
                name: str) -> OffArgmax | None:
    row = np.asarray(row_values, dtype=np.float64)  # (one row in float64: logits are GBs)
    if row.size == 0:
        return None
    nan = np.isnan(row)
    row = np.where(nan, -np.inf, row)
    best = int(np.argmax(row))
    if not 0 <= chosen < row.size:
        return OffArgmax(step, chosen, best, float("inf"), name)
    if nan[chosen]:  # no gap to measure: the chosen token's own logit is NaN
        return OffArgmax(step, chosen, best, float("nan"), name)
    gap = float(row[best] - row[chosen])
    if gap <= _TIE * max(1.0, abs(float(row[best]))):
        return None
    return OffArgmax(step, chosen, best, gap, name)


def _token_rows(dump: Dump) -> dict[int, list[tuple[int, int]]]:
    """Per step with logits, (row, the index in ``generated_token_ids`` of the token that
    row chose). A row predicts the token after the position it was fed: with positions
    recorded, a step that fed several tokens and kept a logits row for each (speculative
    decoding) chose several; without, step i's last row chose token i."""
    fed = fed_per_step(dump)
    first = next((pos for _, pos in fed.values() if pos), None)
    n = prompt_length(dump.meta) or (first[-1] + 1 if first else None)
    out: dict[int, list[tuple[int, int]]] = {}
    for step in dump.steps:
        rec = _logits_record(dump, step)
        if rec is None:
            continue
        rows = rec.numel // rec.shape[-1] if rec.shape[-1] else 0
        pos = fed.get(step, (None, None))[1]
        if pos and n is not None and 0 < rows <= len(pos):
            out[step] = [(j, pos[len(pos) - rows + j] + 1 - n) for j in range(rows)]
        elif rows:
            out[step] = [(rows - 1, step)]
    return out


def check_tokens(ref: Dump, cand: Dump) -> TokenCheck:
    """The tokens of the two runs (see the module docstring)."""
    ref_tokens, cand_tokens = chosen_tokens(ref.meta), chosen_tokens(cand.meta)
    split = None
    if ref_tokens is not None and cand_tokens is not None:
        split = next((i for i, (a, b) in enumerate(zip(ref_tokens, cand_tokens)) if a != b),
                     None)
    off: list[OffArgmax] = []
    if cand_tokens is not None and _greedy(cand.meta):
        for step, rows in sorted(_token_rows(cand).items()):
            wanted = [(j, i) for j, i in rows if 0 <= i < len(cand_tokens)]
            if not wanted:
                continue
            rec = _logits_record(cand, step)
            assert rec is not None
            values = _rows(cand, rec)
            for j, i in wanted:
                found = _off_argmax(values[j], step, cand_tokens[i], rec.name)
                if found is not None:
                    off.append(found)
            cand.release(rec)
    return TokenCheck(ref_tokens, cand_tokens, split, tuple(off))
