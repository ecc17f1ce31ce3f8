"""A dump as the health checks read it: each record with its role (layer, op), the steps to
check, the layer outputs of a step, the tokens fed, and values read as float rows.

Roles come from lockstep's name tables and guesses (``align.roles.role_of_name``: the
layer of an engine's own ``L0.xq`` too). A layer's output, where no name says which record
it is, comes from the structure: the last record of that layer in the step with the hidden
width and one row per token fed. Where norms add the residual (vLLM's and SGLang's
``(normed, residual)``), the last layer's output is the final norm's second output.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from typing import Any

import numpy as np

from ..align.kinds import Kind
from ..align.roles import role_of_name
from ..align.steps import Fed, fed_per_step
from ..store import Dump, Record

__all__ = ["Entry", "DumpView", "FLOAT_DTYPES", "STAT_KEYS"]

FLOAT_DTYPES = {"float64", "float32", "float16", "bfloat16", "float8_e4m3fn", "float8_e5m2"}
#: the stored statistics two stats-only records must share to be called equal
STAT_KEYS = ("min", "max", "mean", "std", "abs_max")


@dataclass(frozen=True)
class Entry:
    """A record and what it holds."""

    record: Record
    layer: int | None
    op: str  #: canonical op ("q", "out", "logits"...), "" when nothing says

    @property
    def name(self) -> str:
        return self.record.name

    @property
    def step(self) -> int:
        return self.record.step

    @property
    def is_float(self) -> bool:
        return self.record.dtype in FLOAT_DTYPES


def _entry(record: Record) -> Entry:
    role = role_of_name(record.name)
    return Entry(record, role.layer, str(role.op))


class DumpView:
    """The records of an open dump, with roles, and the steps to check (``step``: only that
    one; the checks may still read the step before it)."""

    def __init__(self, dump: Dump, step: int | None = None) -> None:
        self.dump = dump
        self.entries = [_entry(r) for r in dump.records]
        self._by_step: dict[int, list[Entry]] = {}
        for e in self.entries:
            self._by_step.setdefault(e.step, []).append(e)
        self.all_steps = sorted(self._by_step)
        self.steps = [s for s in self.all_steps if step is None or s == step]
        self._outputs: dict[int, dict[int, Entry]] = {}  # layer_outputs, found once a step

    # -- records ------------------------------------------------------------------------------
    def in_step(self, step: int) -> list[Entry]:
        return self._by_step.get(step, [])

    def first(self, step: int, op: str, layer: int | None = None) -> Entry | None:
        return next((e for e in self.in_step(step) if e.op == op and e.layer == layer), None)

    def stats(self, e: Entry) -> dict[str, Any]:
        return self.dump.stats(e.record)

    def values(self, e: Entry) -> np.ndarray | None:
        """The data as float64 (None: a stats-only record, or not a float)."""
        if not e.record.has_data or not e.is_float:
            return None
        return np.asarray(self.dump.read(e.record), dtype=np.float64)

    def rows(self, e: Entry) -> np.ndarray | None:
        """The data as rows of its last dimension (one per token for an activation)."""
        v = self.values(e)
        if v is None or v.ndim == 0 or v.shape[-1] == 0:
            return None
        return v.reshape(-1, v.shape[-1])

    # -- tokens -------------------------------------------------------------------------------
    @cached_property
    def _fed(self) -> dict[int, Fed]:
        return fed_per_step(self.dump)

    def fed(self, step: int) -> list[int] | None:
        """The token ids fed at ``step``, where a record holds them (``align.steps``: under
        an engine's own name too, found by the prompt's tokens)."""
        ids = self._fed.get(step, (None, None))[0]
        return None if ids is None else list(ids)

    def positions(self, step: int) -> list[int] | None:
        """The positions fed at ``step``, where a record holds them."""
        pos = self._fed.get(step, (None, None))[1]
        return None if pos is None else list(pos)

    def tokens(self, step: int) -> int | None:
        """How many tokens ``step`` ran: from the ids fed, else the embedding's rows."""
        fed = self.fed(step)
        if fed is not None:
            return len(fed)
        emb = self.first(step, Kind.EMBED)
        if emb is not None and emb.record.shape:
            return emb.record.numel // emb.record.shape[-1]
        return None

    def keys(self, step: int) -> int | None:
        """Positions in the context after ``step``: the tokens of every step up to it."""
        counts = [self.tokens(s) for s in self.all_steps if s <= step]
        return None if any(c is None for c in counts) else sum(c for c in counts if c)

    # -- layers -------------------------------------------------------------------------------
    def hidden(self, step: int) -> int | None:
        """The model's hidden width: the embedding's (or the final norm's) last dimension."""
        for op in (Kind.EMBED, Kind.FINAL_NORM):
            e = self.first(step, op)
            if e is not None and e.record.shape:
                return e.record.shape[-1]
        return None

    def layer_outputs(self, step: int) -> dict[int, Entry]:
        """Each layer's output record at ``step``, by layer: the first record named a layer
        output, else the last float record of the layer with the hidden width and one row per
        token (an engine's own names). Found once per step: most checks read them."""
        if step not in self._outputs:
            self._outputs[step] = self._find_outputs(step)
        return self._outputs[step]

    def _find_outputs(self, step: int) -> dict[int, Entry]:
        named: dict[int, Entry] = {}
        last: dict[int, Entry] = {}
        width, tokens = self.hidden(step), self.tokens(step)
        residual_sum = None  # a fused final norm's second output
        for e in self.in_step(step):
            if not e.is_float or not e.record.shape:
                continue
            shape = e.record.shape
            hidden_rows = width is not None and shape[-1] == width and (
                tokens is None or e.record.numel == tokens * width)
            if e.layer is None:
                if e.op == Kind.FINAL_NORM and e.name.endswith(":1") and hidden_rows:
                    residual_sum = e
                continue
            if e.op == Kind.OUT:
                named.setdefault(e.layer, e)
            if hidden_rows:
                last[e.layer] = e
        if named and residual_sum is not None and last:
            # vLLM's and SGLang's layers return (hidden, residual) and each norm adds them
            # first: a layer's output is the next layer's norm's second output (named so by
            # the table), and the last layer's the final norm's
            named.setdefault(max(last), residual_sum)
        return dict(sorted((named or last).items()))

    def stored_range(self, e: Entry) -> tuple[float, float] | None:
        """A statistics-only record's (min, max), where its stored statistics give them and
        hold no NaN or Inf."""
        st = e.record.stats or {}
        lo, hi = st.get("min"), st.get("max")
        if st.get("nan") or st.get("inf") or not isinstance(lo, (int, float)) or \
                not isinstance(hi, (int, float)):
            return None
        return float(lo), float(hi)

    def same_stats(self, a: Entry, b: Entry) -> bool | None:
        """Whether two stats-only records' statistics are all equal (and not all zero: the
        constant check's); None when either lacks them."""
        sa, sb = a.record.stats, b.record.stats
        if sa is None or sb is None or a.record.has_data or b.record.has_data:
            return None
        va, vb = [sa.get(k) for k in STAT_KEYS], [sb.get(k) for k in STAT_KEYS]
        if not all(isinstance(v, (int, float)) for v in va + vb) or sa.get("nan") or \
                sa.get("inf") or not any(va):
            return None
        return va == vb
