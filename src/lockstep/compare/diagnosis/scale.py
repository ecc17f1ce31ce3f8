"""The ``scale`` diagnosis on a tensor: the candidate is the reference times one constant
(the embedding by √hidden or 1/√hidden, q/k after RoPE by a factor on cos and sin such as
YaRN's attention factor). Kept to the ops where one factor is a known mistake; a norm's
factor is an ``op``, an embedding's other factors an ``embedding``."""

from __future__ import annotations

import math

from ...align.kinds import Kind as K
from ...textfmt import fmt
from .. import evidence as ev
from ..case import Case, label
from .model import Diagnosis, make, rule

__all__ = ["scale", "factor_name"]

_OPS = (K.EMBED, K.Q_ROPE, K.K_ROPE)


def factor_name(factor: float, width: int) -> str | None:
    """√width or 1/√width when the factor is one of them (width: the hidden size)."""
    root = math.sqrt(width)
    for value, name in ((root, f"√hidden (√{width})"), (1 / root, f"1/√hidden (1/√{width})")):
        if abs(factor / value - 1) < 1e-3:
            return name
    return None


@rule("scale")
def scale(case: Case) -> Diagnosis | None:
    """cand = s · ref for one s away from 1, the residual within what precision explains."""
    f = case.first
    role = case.role(f)
    arrays = case.arrays(f)
    if role.op not in _OPS or arrays is None:
        return None
    r, c = arrays
    s, residual = ev.fit_scale(r, c)
    if not math.isfinite(s) or abs(s - 1) < 1e-3 or not case.explains(residual):
        return None
    width = int(ev.squeeze(r).shape[-1]) if r.size else 0
    evidence = [f"the candidate's {label(f)} is the reference's times {s:.6g}: relative L2 "
                f"{fmt(f.error)} before that factor, {fmt(residual)} after it"]
    named = factor_name(s, width) if role.op == K.EMBED and width else None
    if role.op == K.EMBED and named is None:
        return None  # another factor on the embedding: the ``embedding`` diagnosis says it
    what = "embedding" if role.op == K.EMBED else f"{role.op} of layer {role.layer}"
    title = f"the {what} differs by a constant factor {s:.4g}"
    if role.op == K.EMBED:
        checks = ["the embedding scale: Gemma multiplies the rows by √hidden once (in "
                  "transformers 5 inside the embedding module); a caller that scales again, or "
                  "an engine that never does, is off by exactly √hidden",
                  "the scale's dtype: transformers casts √hidden to the weights' dtype first"]
        if named:
            title += f" = {named}"
    else:
        ratio = s if s > 1 else 1 / s
        evidence.append(f"a factor on cos and sin: YaRN's attention factor 0.1·ln(factor) + 1 "
                        f"is {ratio:.6g} for a factor of {math.exp((ratio - 1) / 0.1):.4g}")
        checks = ["the factor cos and sin are multiplied by (YaRN's attention_factor, "
                  "mscale): missing, applied twice, or taken from another config key",
                  "q/k scaled before RoPE (a softmax scale folded into q)"]
    return make("scale", title, checks, evidence, factor=s, residual=residual,
                named=named)
