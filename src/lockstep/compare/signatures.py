"""Diagnoses read off the diverging tensor itself: NaN/Inf, zeros, a stale value, another
layout, a norm over blocks. Each takes the ``Case`` and returns a ``Diagnosis`` or None."""

from __future__ import annotations

import re
from typing import Any

import numpy as np

from . import evidence as ev
from .case import NORMS, ROPE_TABLES, Case, fmt, input_sentence, label, pct
from .diagnosis import Diagnosis, make

__all__ = ["nan", "zeros", "stale", "layout", "blocked_norm"]


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


def zeros(case: Case) -> Diagnosis | None:
    """The candidate exactly zero where the reference is not (all of it, or a quarter)."""
    f = case.first
    arrays = case.arrays(f)
    if arrays is None or case.role(f).op in ("input_ids", "positions"):
        return None
    r, c = arrays
    zeroed, nonzero = ev.zeroed(r, c)
    if not nonzero or zeroed < 0.25 * nonzero:
        return None
    every = bool(ev.value_range(c).zero)
    what = "is all zeros" if every else f"is zero at {pct(zeroed, nonzero)} of the elements"
    evidence = [f"{zeroed} of the {nonzero} elements that are non-zero in the reference are "
                f"exactly 0 in the candidate ({label(f)}, step {f.step})"]
    sentence, inp = input_sentence(case, f)
    evidence.append(sentence)
    checks = ([f"the weights of {label(f)} were never loaded or copied to the device "
               "(`lockstep weights`)",
               "the kernel never wrote its output: a failed or skipped launch, a wrong output "
               "pointer, the result read before the kernel finished"] if every else
              ["the kernel writes only part of its output: its grid or loop bounds (heads, "
               "tiles, rows), a zero-initialised buffer only partly filled",
               f"part of the weights of {label(f)} not loaded (missing rows or shards)"])
    return make("zeros", f"the candidate's {label(f)} {what} where the reference's is not",
                checks, evidence, zeroed=zeroed, nonzero_in_reference=nonzero,
                all_zero=every, input=label(inp) if inp else None)


def stale(case: Case) -> Diagnosis | None:
    """The candidate's tensor equal to its own value at the previous step, the reference's
    not (a prefill's value: its last position)."""
    f = case.first
    if f.step == 0 or case.role(f).op in ("input_ids", "positions", "embed", *ROPE_TABLES):
        return None
    prev = case.same_name(f, f.step - 1)
    now, before = case.arrays(f), case.arrays(prev) if prev is not None else None
    if now is None or before is None:
        return None
    (r, c), (rp, cp) = (ev.squeeze(a) for a in now), (ev.squeeze(a) for a in before)
    if cp.shape != c.shape:  # the previous step was the prefill: its last position
        if cp.ndim == c.ndim + 1 and cp.shape[1:] == c.shape:
            cp, rp = cp[-1], rp[-1]
        else:
            return None
    same, moved = ev.rel_error(cp, c), ev.rel_error(rp, r)
    if same > 1e-7 or moved <= case.good():
        return None
    evidence = [f"the candidate's {label(f)} at step {f.step} equals its own value at step "
                f"{f.step - 1} (relative difference {fmt(same)}); the reference's changed by "
                f"{fmt(moved)}"]
    checks = ["the buffer holding this tensor is not rewritten at the new step: the decode "
              "path reuses the previous output (an in-place write to another buffer, a "
              "missing copy)",
              "a captured graph (CUDA graph) replayed with stale inputs: copy the new step's "
              "inputs into the captured buffers",
              "the new token and position reach this op at all (the step ran on old inputs)"]
    return make("stale", f"the candidate's {label(f)} at step {f.step} is its value from step "
                f"{f.step - 1}: not updated", checks, evidence, step=f.step,
                previous_step=f.step - 1, reference_change=moved)


def layout(case: Case) -> Diagnosis | None:
    """The candidate equal to the reference once reordered (evidence.find_layout)."""
    f = case.first
    arrays = case.arrays(f)
    if arrays is None or case.role(f).op in ("input_ids", "positions"):
        return None
    r, c = arrays
    heads = [h for h in (case.meta("n_heads"), case.meta("n_kv_heads")) if h]
    fix = ev.find_layout(r, c, case.head_dim(r), heads, case.good())
    if fix is None or not case.explains(fix.error):
        return None
    spec = f"{f.cand_transform}|{fix.spec}" if f.cand_transform else fix.spec
    rope = fix.spec.startswith("rope_")
    if rope:
        title = (f"{label(f)}: the candidate's head dims are in {fix.stored}, the "
                 f"reference's in {fix.expected}")
    else:
        title = (f"{label(f)}: the candidate holds the reference's values laid out as "
                 f"{fix.stored} instead of {fix.expected}")
    evidence = [f"reordered by `{fix.spec}`, the candidate matches: relative L2 "
                f"{fmt(f.error)} -> {fmt(fix.error)}"]
    checks = ([f"the RoPE pair convention: interleaved (GGUF, Meta) vs half-split "
               "(transformers); Q/K weights permuted by a GGUF conversion"] if rope else
              [f"the indexing of the kernel that writes {label(f)}: a missing transpose or "
               "permute, heads and positions swapped, a GEMM transpose flag or leading "
               "dimension, strides of a non-contiguous view"])
    checks.append(f"if the layout is intended, declare it: a mapping-file entry with "
                  f"transform `{spec}` pairs the two")
    return make("layout", title, checks, evidence, transform=spec, candidate_fix=fix.spec,
                error_after=fix.error, stored=fix.stored, expected=fix.expected)


#: a reference transform that takes one block of the (transformed) reference tensor
_BLOCK_SPEC = re.compile(r"(?:(.*)\|)?\s*block\((\d+),\s*(\d+)\)\s*")


def _gathered(case: Case) -> tuple[np.ndarray, np.ndarray, int] | None:
    """(the whole reference tensor, the candidate's blocks of it in place with NaN between,
    how many blocks) when the first divergence pairs a block with a whole reference record."""
    f = case.first
    m = _BLOCK_SPEC.fullmatch(f.ref_transform or "")
    if m is None:
        return None
    r = case.read(case.ref, case.ref_record(f), m.group(1))
    if r is None:
        return None
    c = np.full(r.size, np.nan)
    count = 0
    for p in case.step:
        q = _BLOCK_SPEC.fullmatch(p.ref_transform or "")
        if p.ref_seq != f.ref_seq or q is None or q.group(1) != m.group(1):
            continue
        size, index = int(q.group(2)), int(q.group(3))
        part = case.read(case.cand, case.cand_record(p), p.cand_transform)
        if part is not None and part.size == size and size * (index + 1) <= r.size:
            c[size * index:size * (index + 1)] = part.reshape(-1)
            count += 1
    return r, c.reshape(r.shape), count


def blocked_norm(case: Case) -> Diagnosis | None:
    """A norm over blocks of b elements instead of the head (or row): cand/ref is one
    factor per block, the factors differ within a head or equal rms(head)/rms(block) of
    the norm's input."""
    f = case.first
    role = case.role(f)
    if role.op not in NORMS and role.op and "norm" not in f.ref_name.lower():
        return None
    gathered = _gathered(case)
    if gathered is not None:
        r, c, count = gathered
    else:
        arrays = case.arrays(f)
        if arrays is None:
            return None
        (r, c), count = arrays, 0
    head_dim = case.head_dim(r)
    shape = ev.squeeze(r).shape
    extents = [d for d in (head_dim, shape[-1] if shape else None) if d and r.size % d == 0]
    inp = case.input_of(f)
    inp_arrays = case.arrays(inp) if inp is not None else None
    x = inp_arrays[0] if inp_arrays is not None else None
    eps = float(case.ref.meta.get("rms_norm_eps") or case.cand.meta.get("rms_norm_eps") or 1e-6)
    for extent in dict.fromkeys(extents):
        bs = ev.block_scales(r, c, extent, case.good())
        if bs is None or not case.explains(bs.residual):
            continue
        confirmed = None
        if x is not None and x.size == r.size:
            predicted = ev.block_rms_ratio(x, extent, bs.block, bs.blocks, eps)
            confirmed = float(np.max(np.abs(predicted - np.asarray(bs.scales)) /
                                     np.maximum(np.abs(predicted), 1e-30)))
        varies = bs.per_extent > 1 and bs.spread > 1e-2
        if not varies and (confirmed is None or confirmed > 1e-2):
            continue
        unit = "head" if extent == head_dim else "row"
        which = "QK-norm" if role.op in ("q_norm", "k_norm") else "RMSNorm"
        evidence = [f"candidate/reference is one factor per {bs.block}-element block "
                    f"(residual {fmt(bs.residual)} against an error of {fmt(f.error)})"]
        if varies:
            evidence.append(f"the factors of blocks within one {extent}-element extent differ "
                            f"by up to {100 * bs.spread:.3g}%")
        if confirmed is not None and confirmed <= 1e-2 and inp is not None:
            evidence.append(f"each factor is rms over the {unit} / rms over the block of "
                            f"the input {label(inp)} (largest difference "
                            f"{100 * confirmed:.2g}%)")
        if gathered is not None:
            evidence.append(f"gathered from {count} candidate blocks of the reference's "
                            f"{f.ref_name} ({len(bs.blocks)} blocks of {bs.block} compared)")
        checks = [f"the norm's reduction: the mean of squares must run over all {extent} "
                  f"elements (the {unit}), not over the {bs.block} one thread block or "
                  "tile holds (a partial sum never reduced across tiles)",
                  "the norm weight slice per block is not the cause: the ratio does not "
                  "depend on it"]
        detail: dict[str, Any] = {"block": bs.block, "extent": extent,
                                  "blocks_compared": len(bs.blocks), "residual": bs.residual,
                                  "spread": bs.spread, "input_mismatch": confirmed}
        if extent == head_dim:
            detail["head_dim"] = extent
        return make("blocked_norm", f"{which} computed over {bs.block}-element blocks "
                    f"instead of the {unit}'s {extent} elements ({label(f)}, step {f.step})",
                    checks, evidence, **detail)
    return None
