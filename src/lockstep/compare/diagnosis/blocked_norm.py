"""The ``blocked_norm`` rule: a norm computed over blocks of b elements instead of the head
(or row)."""

from __future__ import annotations

import re
from typing import Any

import numpy as np

from ...align.kinds import Kind as K
from ...textfmt import fmt
from .. import evidence as ev
from ..case import Case, label
from ..ops import NORMS
from .model import Diagnosis, make, rule

__all__ = ["blocked_norm"]

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


@rule("blocked_norm")
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
    qk_norm = role.op in (K.Q_NORM, K.K_NORM)
    # a QK-norm's extent is the head, any other norm's the row: tried first. The input, where
    # recorded, says which extent the factors come from (rms over it / rms over the block)
    order = (head_dim, shape[-1] if shape else None)
    extents = [d for d in (order if qk_norm else order[::-1]) if d and r.size % d == 0]
    inp = case.input_of(f)
    inp_arrays = case.arrays(inp) if inp is not None else None
    x = inp_arrays[0] if inp_arrays is not None else None
    eps = float(case.ref.meta.get("rms_norm_eps") or case.cand.meta.get("rms_norm_eps") or 1e-6)
    found = []
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
        if varies or (confirmed is not None and confirmed <= 1e-2):
            found.append((extent, bs, confirmed, varies))
    if not found:
        return None
    # the extent the input confirms, else the first that fits
    extent, bs, confirmed, varies = min(
        found, key=lambda e: not (e[2] is not None and e[2] <= 1e-2))
    unit = "head" if extent == head_dim else "row"
    which = "QK-norm" if qk_norm else "RMSNorm"
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
