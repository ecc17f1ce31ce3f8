"""The ``nan`` rule: NaN/Inf appear at the diverging tensor on one side only: how many,
where, and the values captured just before."""

from __future__ import annotations

from typing import Any

from ...textfmt import fmt, pct
from .. import evidence as ev
from ..case import Case, label
from .model import Diagnosis, make, rule

__all__ = ["nan"]

@rule("nan")
def nan(case: Case) -> Diagnosis | None:
    """NaN/Inf on one side only: how many, where, and the values captured just before."""
    f = case.first
    m = f.metrics
    if m is None or not m.nonfinite_mismatch:
        return None
    arrays = case.arrays(f)
    if arrays is None:
        return None
    cand_side = m.cand_nan + m.cand_inf >= m.ref_nan + m.ref_inf
    side, other = ("candidate", "reference") if cand_side else ("reference", "candidate")
    nf = ev.nonfinite(arrays[1] if cand_side else arrays[0])
    where = (f", in {nf.row_count} of {nf.row_total} rows (first: "
             f"{', '.join(map(str, nf.rows))})" if nf.row_total > 1 else "")
    evidence = [f"the {side}'s {label(f)} holds {nf.nan} NaN and {nf.inf} Inf of {nf.numel} "
                f"elements ({pct(nf.count, nf.numel)}){where}; the {other}'s is finite"]
    inputs: list[dict[str, Any]] = []
    earlier = [p for p in case.step if p.ref_seq < f.ref_seq][-3:]
    direct = case.input_of(f)
    if direct is not None and direct not in earlier:
        earlier = [direct] + earlier
    big = zero = None
    for p in reversed(earlier):
        a = case.arrays(p)
        if a is None:
            continue
        vr = ev.value_range(a[1] if cand_side else a[0])
        inputs.append({"name": label(p), "min": vr.min, "max": vr.max, "abs_max": vr.abs_max,
                       "nonfinite": vr.nonfinite, "all_zero": vr.zero})
        state = "all zeros" if vr.zero else (f"{vr.nonfinite} NaN/Inf" if vr.nonfinite
                                             else "finite")
        evidence.append(f"captured before it: {label(p)}, {side} values in [{fmt(vr.min)}, "
                        f"{fmt(vr.max)}] ({state})")
        if vr.abs_max >= 6.0e4 and big is None:
            big = (p, vr.abs_max)
        if vr.zero and zero is None:
            zero = p
    origin, bad_inputs = _first_nonfinite(case, cand_side)
    if origin is not None:
        evidence.insert(0, f"in capture order the first {side} tensor holding NaN/Inf is "
                           f"{origin[0]} ({origin[1]} of {origin[2]} elements)"
                        + ("; the other side records no tensor of that name"
                           if origin[3] else ""))
    if bad_inputs:
        evidence.append("inputs that are not finite: " + ", ".join(bad_inputs))
    checks = []
    dtype = f.cand_dtype if cand_side else f.ref_dtype
    if big is not None:
        checks.append(f"overflow: {label(big[0])} reaches {fmt(big[1])}"
                      + (" (float16 stops at 65504)" if dtype == "float16" else "")
                      + "; compute this op in float32 or rescale")
    if zero is not None:
        checks.append(f"a division by zero: {label(zero)} is all zeros (a norm without eps, "
                      "a 0/0 in a softmax)")
    checks += [f"the weights {label(f)} uses hold NaN/Inf: `lockstep inspect CHECKPOINT` "
               "lists them by component (a bad adapter, a failed conversion)",
               "memory read before it was written: an uninitialised output buffer, a pointer "
               "to memory that moved (tensors moved between devices), a missing synchronisation",
               "a softmax over a fully masked row (all -inf), a log or sqrt of a non-positive "
               "value"]
    finite = all(not i["nonfinite"] for i in inputs) and origin is None and not bad_inputs
    if origin is not None:
        title = (f"NaN/Inf first appear in the {side} at {origin[0]}, step {f.step}"
                 + (f" ({'recorded by the ' + side + ' only'})" if origin[3] else "")
                 + f"; the first compared tensor holding them is {label(f)}, {nf.count} "
                 f"({pct(nf.count, nf.numel)})")
    else:
        title = (f"{nf.count} NaN/Inf ({pct(nf.count, nf.numel)}) first appear in the {side} "
                 f"at {label(f)}, step {f.step}" + ("; what was captured before it is finite"
                                                    if inputs and finite else ""))
    if bad_inputs:
        title += f"; inputs not finite: {', '.join(bad_inputs)}"
    return make("nan", title, checks, evidence, side=side, nan=nf.nan, inf=nf.inf,
                numel=nf.numel, fraction=nf.fraction, rows=list(nf.rows), inputs=inputs,
                first_nonfinite=origin[0] if origin else label(f),
                nonfinite_inputs=bad_inputs)


def _first_nonfinite(case: Case, cand_side: bool) -> tuple[tuple[str, int, int, bool] | None,
                                                           list[str]]:
    """On the side holding NaN, at the first divergence's step: the first record in capture
    order that holds NaN/Inf before the diverging one (name, count, size, whether the other
    side has no record of that name), and the names of input records that are not finite."""
    f = case.first
    dump, other = (case.cand, case.ref) if cand_side else (case.ref, case.cand)
    until = f.cand_seq if cand_side else f.ref_seq
    other_names = {r.name for r in other.records}
    origin = None
    inputs: list[str] = []
    for rec in dump.records:
        if rec.step != f.step or not rec.has_data or rec.seq > until:
            continue
        if rec.dtype in ("bool", "int8", "int16", "int32", "int64", "uint8"):
            continue
        try:
            nf = ev.nonfinite(dump.read(rec))
        except (ValueError, TypeError, OSError):
            continue
        if not nf.count:
            continue
        if rec.extra.get("role") == "input":
            inputs.append(rec.name)
        elif origin is None and rec.seq < until:
            origin = (rec.name, nf.count, nf.numel, rec.name not in other_names)
    return origin, inputs
