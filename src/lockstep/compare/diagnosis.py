"""The diagnosis: what kind of problem the first divergence is, and what to check.

Read from the dumps themselves, beside the first divergence: a handful of tensors (the pair
that diverged, its inputs, the same tensor at the previous step) and the errors every pair
already has. The most specific explanation wins; the tests run in this order:

0. ``sampling``: the logits agree, the token does not: the candidate's chosen token is not
   the argmax of its own logits, or the two sides chose different tokens.
1. ``nan``: NaN/Inf appear at this tensor on one side only.
2. ``zeros``: the candidate is all zeros (or largely) where the reference is not.
3. ``stale``: the candidate equals its own value at the previous step; the reference moved.
4. ``layout``: a transpose, a (T, H, D) <-> (H, T, D) reordering or the interleaved <->
   half-split RoPE order of the candidate matches the reference.
5. ``blocked_norm``: cand/ref is one factor per block of b elements (b < head_dim), the
   factors differ between blocks, or equal rms(head)/rms(block) of the norm's input.
5a. ``moe``: a mixture-of-experts layer: which tokens chose other experts, whether the
   router logits agree and the weights sum to 1, which experts' rows differ, whether the
   shared expert is in the sum (``moe``).
5b. ``softcap``, ``window``, ``scale`` (attention): attention recomputed from the reference's
   q, k, v reproduces the candidate with the soft cap left out, another window, or another
   score scale (``attention_fit``).
5c. ``scale``: the embedding or q/k after RoPE is the reference's times one constant
   (√hidden, YaRN's attention factor; ``scale``).
6. ``embedding``: token ids or embeddings differ at prefill.
7. ``decode``: prefill agrees, a decode step does not: the token fed, its position, or the
   KV cache, by where the divergence is and which of its inputs agree.
8. ``logits``: the final norm agrees, the logits do not.
9. ``rope``: q/k before RoPE agree, after RoPE they do not.
10. ``op``: the fallback: an op's output differs while its input agrees.

The tests live beside this module: ``sampling`` (0, read off the chosen tokens, see
``tokens``), ``signatures`` (1-5, read off the diverging tensor), ``stages`` (6-8 and 10, by
where it sits) and ``rope`` (9), all working on a ``case.Case`` with the numpy tests of
``evidence``.
"""

from __future__ import annotations

import math
import os
import warnings
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Mapping, Sequence

import numpy as np

from ..store.reader import Dump

if TYPE_CHECKING:
    from .comparison import Comparison

__all__ = ["Diagnosis", "KINDS", "diagnose", "diagnose_safely", "make"]

#: every kind, in the order the tests run (see the module docstring)
KINDS = ("sampling", "nan", "zeros", "stale", "layout", "blocked_norm", "moe", "softcap",
         "window", "scale", "embedding", "decode", "logits", "rope", "op")


@dataclass(frozen=True)
class Diagnosis:
    """What kind of problem the first divergence is, why we think so, and what to check."""

    kind: str  #: one of KINDS
    title: str  #: one line a person acts on, with the numbers
    checks: tuple[str, ...]  #: what to check, most likely first
    evidence: tuple[str, ...]  #: sentences with the measured figures
    detail: Mapping[str, Any] = field(default_factory=dict)  #: machine-readable, JSON-safe

    def as_dict(self) -> dict[str, Any]:
        """The diagnosis as the JSON report writes it."""
        return {"kind": self.kind, "title": self.title, "checks": list(self.checks),
                "evidence": list(self.evidence), "detail": dict(self.detail)}


def _json(value: Any) -> Any:
    """``value`` with numpy scalars made plain and non-finite floats written as strings."""
    if isinstance(value, Mapping):
        return {str(k): _json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json(v) for v in value]
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    if isinstance(value, (int, np.integer)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        x = float(value)
        return x if math.isfinite(x) else ("nan" if math.isnan(x) else
                                           ("inf" if x > 0 else "-inf"))
    return value if value is None or isinstance(value, str) else str(value)


def make(kind: str, title: str, checks: Sequence[str], evidence: Sequence[str],
         **detail: Any) -> Diagnosis:
    """A Diagnosis with its detail made JSON-safe."""
    assert kind in KINDS, kind
    return Diagnosis(kind, title, tuple(checks), tuple(evidence), _json(detail))


def diagnose(comparison: Comparison, ref: Dump, cand: Dump) -> Diagnosis | None:
    """What kind of problem the first divergence is; None unless the verdict is diverged."""
    if comparison.verdict != "diverged" or comparison.first_divergence is None:
        return None
    # the tests build Diagnosis records from this module, so they are imported here
    from . import attention_fit, moe, rope, sampling, scale, signatures, stages
    from .case import Case

    case = Case(comparison, ref, cand)
    for rule in (sampling.sampling, signatures.nan, signatures.zeros, signatures.stale, signatures.layout,
                 signatures.blocked_norm, moe.moe, attention_fit.attention, scale.scale,
                 stages.embedding, stages.decode, stages.logits, rope.rope):
        found = rule(case)
        if found is not None:
            return found
    return stages.op(case)


def diagnose_safely(comparison: Comparison, ref: Dump, cand: Dump) -> Diagnosis | None:
    """``diagnose``, but a bug in it never costs the comparison: it warns and gives None
    (under pytest, or with LOCKSTEP_STRICT set, the error is raised)."""
    try:
        return diagnose(comparison, ref, cand)
    except Exception as exc:
        if "PYTEST_CURRENT_TEST" in os.environ or os.environ.get("LOCKSTEP_STRICT"):
            raise
        warnings.warn(f"lockstep: the diagnosis failed ({type(exc).__name__}: {exc}); the "
                      "comparison itself is complete", RuntimeWarning, stacklevel=2)
        return None
