"""The ``norm_eps`` rule: an RMSNorm that adds another epsilon than the reference's.

``y = x / sqrt(mean(x^2) + eps) * w``: with the input ``x`` agreeing, a different ``eps``
makes the candidate's row the reference's times ``sqrt((m + eps_ref) / (m + eps_cand))``,
``m`` the row's mean square. So every row is one factor ``s`` of the reference's, and
``m * (1 / s^2 - 1)`` is the same number for every row, however different their ``m``: the
difference of the two epsilons. A weight that is scaled gives one factor for every row
instead, and a norm over the wrong extent factors that do not follow ``m``.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ...align.kinds import Kind as K
from ...textfmt import fmt
from ..case import Case, label
from ..ops import NORMS
from .model import Diagnosis, make, rule

__all__ = ["norm_eps"]

_MIN_ROWS = 2  # rows of different mean square the difference must agree over
_AGREE = 0.05  # the rows' differences agree within this fraction of their median
_SPREAD = 0.2  # the rows' mean squares differ by this fraction at least


def _eps(meta: Any) -> float | None:
    value = meta.get("rms_norm_eps")
    try:
        return float(value) if value is not None else None
    except (TypeError, ValueError):
        return None


@rule("norm_eps")
def norm_eps(case: Case) -> Diagnosis | None:
    """Each row of the norm's output is one factor of the reference's, and the factors follow
    the rows' mean squares as a different epsilon makes them."""
    f = case.first
    role = case.role(f)
    if role.op not in NORMS:
        return None
    arrays = case.arrays(f)
    inp = case.input_of(f)
    if arrays is None or inp is None or not case.agrees(inp):
        return None
    inputs = case.arrays(inp)
    if inputs is None:
        return None
    r, c = arrays
    x = inputs[0]
    extent = case.head_dim(r) if role.op in (K.Q_NORM, K.K_NORM) else r.shape[-1]
    if not extent or r.size != x.size or r.size % extent:
        return None
    r, c, x = (a.reshape(-1, extent) for a in (r, c, x))
    keep = (np.abs(r).sum(axis=1) > 0) & (np.abs(x).sum(axis=1) > 0)
    r, c, x = r[keep], c[keep], x[keep]
    if len(r) < _MIN_ROWS:
        return None
    s = (c * r).sum(axis=1) / (r * r).sum(axis=1)  # each row's factor
    residual = float(np.linalg.norm(c - s[:, None] * r)) / max(float(np.linalg.norm(r)), 1e-300)
    if not case.explains(residual) or np.any(s <= 0):
        return None
    m = (x * x).mean(axis=1)
    if float(m.max() - m.min()) < _SPREAD * float(np.median(m)):
        return None  # one mean square: a scaled weight would look the same
    delta = m * (1.0 / (s * s) - 1.0)  # eps_cand - eps_ref, one per row
    centre = float(np.median(delta))
    if centre == 0.0 or float(np.max(np.abs(delta - centre))) > _AGREE * abs(centre):
        return None
    ref_eps = _eps(case.ref.meta)
    cand_eps = _eps(case.cand.meta)
    measured = None if ref_eps is None else ref_eps + centre
    if measured is not None and ref_eps is not None:
        told = f"epsilon {fmt(measured)} where the reference's is {fmt(ref_eps)}"
    else:
        told = f"epsilon {'larger' if centre > 0 else 'smaller'} than the reference's by " \
               f"{fmt(abs(centre))}"
    evidence = [f"each row of {label(f)} is one factor of the reference's (residual "
                f"{fmt(residual)} against an error of {fmt(f.error)})",
                f"the factors follow the rows' mean squares of the input {label(inp)}: "
                f"mean square x (1/factor^2 - 1) is {fmt(centre)} in each of {len(r)} rows "
                f"(within {100 * _AGREE:.0f}%), whose mean squares run from "
                f"{fmt(float(m.min()))} to {fmt(float(m.max()))}"]
    if cand_eps is not None and measured is not None and \
            abs(cand_eps - measured) > 0.1 * abs(measured):
        evidence.append(f"the candidate's metadata says rms_norm_eps {fmt(cand_eps)}: its "
                        "kernel does not use it")
    which = "QK-norm" if role.op in (K.Q_NORM, K.K_NORM) else "RMSNorm"
    checks = ["the norm's epsilon: read it from the model's config (rms_norm_eps; GGUF "
              "llama.attention.layer_norm_rms_epsilon), not a constant of the kernel",
              "where it is added: inside the square root, to the mean of squares"]
    return make("norm_eps", f"{which} {label(f)} adds {told} (step {f.step})", checks,
                evidence, difference=centre, reference_eps=ref_eps, candidate_eps=measured,
                rows=len(r), residual=residual)
