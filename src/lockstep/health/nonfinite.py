"""NaN and Inf: the first record holding any, in capture order, and the last finite one
before it: where they start."""

from __future__ import annotations

import numpy as np

from .flags import RED, Checked, CheckResult, Flag
from .view import DumpView, Entry

__all__ = ["check_nonfinite"]


def _counts(view: DumpView, e: Entry) -> tuple[int, int, int] | None:
    """(NaN, +Inf, -Inf) in the record; None when nothing says (no data, no stats)."""
    v = view.values(e)
    if v is not None:
        return (int(np.count_nonzero(np.isnan(v))), int(np.count_nonzero(v == np.inf)),
                int(np.count_nonzero(v == -np.inf)))
    st = e.record.stats
    if st is None or not isinstance(st.get("nan"), int) or not isinstance(st.get("inf"), int):
        return None
    return st["nan"], st["inf"], 0  # stats do not say the sign of an Inf


def check_nonfinite(view: DumpView) -> CheckResult:
    """NaN or Inf anywhere. -Inf alone in a record named a mask is how an engine masks
    attention scores: not counted."""
    seen = bad_records = 0
    first: tuple[Entry, tuple[int, int, int]] | None = None
    last_finite: Entry | None = None
    for step in view.steps:
        for e in view.in_step(step):
            if not e.is_float:
                continue
            counts = _counts(view, e)
            if counts is None:
                continue
            seen += 1
            nan, pinf, ninf = counts
            if nan == 0 and pinf == 0 and (ninf == 0 or "mask" in e.name.lower()):
                if first is None:
                    last_finite = e
                continue
            bad_records += 1
            if first is None:
                first = (e, counts)
    checked = Checked(seen, {"records_with_nan_or_inf": bad_records})
    if first is None:
        return CheckResult((), checked)
    e, (nan, pinf, ninf) = first
    before = (f"; the last finite record before it: {last_finite.name} (step "
              f"{last_finite.step})" if last_finite is not None else
              "; no finite record before it")
    what = ", ".join(f"{n} {label}" for n, label in ((nan, "NaN"), (pinf, "+Inf" if ninf or
                     e.record.has_data else "Inf"), (ninf, "-Inf")) if n)
    flag = Flag("nonfinite", RED, f"{what} of {e.record.numel} elements first in {e.name} "
                f"(step {e.step}){before}; {bad_records} records hold NaN or Inf",
                step=e.step, record=e.name, seq=e.record.seq, steps=(e.step,),
                figures={"nan": nan, "inf": pinf + ninf,
                         "last_finite": last_finite.name if last_finite else None,
                         "records": bad_records})
    return CheckResult((flag,), checked)
