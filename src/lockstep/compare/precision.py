"""A precision a dump declares, held to what the comparison measured.

A dump's metadata may say that its side computes in a lower precision (``compute_dtype``) or
on quantized weights (``quantization``), and the tolerance then allows that side's rounding
or quantization noise (compare.tolerance). A declaration is not a measurement: an engine that
says ``quantization: Q4_1`` because it loads a Q4_1 file, and dequantizes every weight to
float32 at load as the reference does, computes what the reference computes, and an error it
introduces (a wrong RMSNorm epsilon, a weight scaled in layer 1) would pass as quantization
noise: *drift*. So a declared precision counts in a step only where what was measured there
allows it. It does not when, in capture order, the error enters (the first pair over its
match tolerance, everything before it within theirs):

* after the whole first layer recorded in the step agreed (``MIN_EVIDENCE`` float pairs with
  data at least): that layer's matmuls, norms and attention round or quantize as every
  later layer's do, so noise of the declared kind shows there;
* or, when only quantized weights are declared (no lower ``compute_dtype``), at an op with
  no weights to quantize whose input was recorded before it and agreed: a norm (of the
  embedding, of a residual), RoPE, the activation.

Its pairs are then held to the tolerances of the dtypes they were stored in alone (a pair
of two sides that both declare quantized weights otherwise matches within 5%). A precision
measured by replay (``compare(..., cand_precision=)``) is not a declaration and always
counts.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any, Mapping, Sequence

from ..align.kinds import Kind as K
from ..align.structure import layer_of
from .case import role_of
from .pair_result import PairResult
from .tolerance import DTYPE_RTOL, Tolerance

__all__ = ["DECLARING_KEYS", "MIN_EVIDENCE", "PrecisionCheck", "declarations",
           "hold_declared_noise"]

#: the metadata fields that declare a side's precision (compare.tolerance reads them)
DECLARING_KEYS = ("compute_dtype", "quantization")
#: first-layer pairs that must agree before a declared precision is found not in effect
MIN_EVIDENCE = 3


def declarations(meta: Mapping[str, Any]) -> dict[str, str]:
    """The precision a side's metadata declares below its stored dtypes': ``quantization``,
    and a ``compute_dtype`` less precise than float32."""
    said = {k: str(meta[k]) for k in DECLARING_KEYS if meta.get(k)}
    if DTYPE_RTOL.get(said.get("compute_dtype", ""), 0.0) <= DTYPE_RTOL["float32"]:
        said.pop("compute_dtype", None)  # float32, float64, or a name no tolerance knows
    return said


#: ops with no weights, each with the ops its input comes from (any one recorded will do;
#: ``-1``: the layer before's); a norm of the first layer reads the embedding
_NO_WEIGHTS: dict[str, tuple[tuple[int, str], ...]] = {
    K.ATTN_NORM: ((-1, K.OUT), (0, K.EMBED)),
    K.MLP_NORM: ((0, K.ATTN_RESIDUAL),),
    K.Q_NORM: ((0, K.Q), (0, K.QKV)),
    K.K_NORM: ((0, K.K), (0, K.QKV)),
    K.Q_ROPE: ((0, K.Q_NORM), (0, K.Q), (0, K.QKV)),
    K.K_ROPE: ((0, K.K_NORM), (0, K.K), (0, K.QKV)),
    K.ACT: ((0, K.GATE), (0, K.GATE_UP)),
    K.GATE_ACT: ((0, K.GATE), (0, K.GATE_UP)),
}


@dataclass(frozen=True)
class PrecisionCheck:
    """Steps where a declared precision was not taken as noise, and why."""

    declared: dict[str, dict[str, str]]  #: "reference"/"candidate" -> what its dump declares
    steps: tuple[int, ...]  #: the steps where it was not
    why: str  #: at the first of them: what was measured (see the module docstring)
    held: int  #: pairs whose tolerances were taken back to their stored dtypes'

    def sentence(self) -> str:
        said = "; ".join(f"the {side} declares " + ", ".join(f"{k} {v}" for k, v in d.items())
                         for side, d in self.declared.items() if d)
        steps = ", ".join(str(s) for s in self.steps[:8]) + (" ..." if len(self.steps) > 8
                                                           else "")
        return (f"{said}, but {self.why}: that precision is not taken as noise at step "
                f"{steps} ({self.held} pairs held to the precision of their stored dtypes)")

    def as_dict(self) -> dict[str, Any]:
        return {"declared": {k: dict(v) for k, v in self.declared.items()},
                "steps": list(self.steps), "why": self.why, "held": self.held,
                "sentence": self.sentence()}


def _layer(p: PairResult) -> int | None:
    return layer_of(p.canonical or p.ref_name)[0]


def _entry(pairs: Sequence[PairResult]) -> int | None:
    """The index of the pair where the error enters the step: the first over its match
    tolerance with everything before it within theirs; None when there is none."""
    for i, p in enumerate(pairs):
        if p.error > p.tol:
            return i if p.inherited <= p.tol else None
    return None


def _first_layer_agreed(pairs: Sequence[PairResult], entry: int) -> str | None:
    """Why the declared precision is not in effect when the step's first recorded layer
    agreed in full before the error entered; else None."""
    indices = [i for i in (_layer(p) for p in pairs) if i is not None]
    if not indices:
        return None
    first = min(indices)
    layer = [i for i, p in enumerate(pairs) if _layer(p) == first]
    if max(layer) >= entry:
        return None
    measured = [pairs[i] for i in layer if pairs[i].metrics is not None and pairs[i].tol > 0.0]
    if len(measured) < MIN_EVIDENCE:
        return None
    return (f"every tensor of layer {first} agrees within the match tolerance ({len(measured)} "
            f"pairs) before the error enters at {pairs[entry].ref_name}")


def _no_weights_op(pairs: Sequence[PairResult], entry: int) -> str | None:
    """Why quantized weights cannot explain the error: it enters at an op with no weights,
    whose input was recorded before it and agreed; else None."""
    role = role_of(pairs[entry])
    sources = _NO_WEIGHTS.get(role.op)
    if sources is None or role.layer is None:
        return None
    before = {(r.layer, r.op) for r in map(role_of, pairs[:entry])}
    layers = [r for r, _ in before if r is not None]
    first = min(layers, default=role.layer)
    for offset, op in sources:
        where: int | None = role.layer + offset if offset else role.layer
        if op == K.EMBED:
            if role.layer != first:
                continue
            where = None
        if (where, op) in before:
            name = pairs[entry].ref_name
            return (f"the error enters at {name} ({role.op}, an op with no weights to "
                    f"quantize) while its input ({op}) agrees")
    return None


def hold_declared_noise(results: Sequence[PairResult], undeclared: Sequence[Tolerance],
                        declared: dict[str, dict[str, str]]
                        ) -> tuple[list[PairResult], PrecisionCheck | None]:
    """``results`` (in step and capture order, inherited errors set) with each pair's
    tolerance taken back to ``undeclared`` (its tolerance from its stored dtypes and a
    measured precision alone, one per pair) in every step where what was measured shows the
    declared precision is not in effect (the module docstring)."""
    out = list(results)
    if not any(declared.values()):
        return out, None
    quantized_only = not any("compute_dtype" in d for d in declared.values())
    by_step: dict[int, list[int]] = {}
    for i, p in enumerate(out):
        by_step.setdefault(p.step, []).append(i)
    steps: list[int] = []
    why, held = "", 0
    for step, members in by_step.items():
        raised = [i for i in members if (out[i].tol, out[i].noise) != (
            undeclared[i].match, undeclared[i].noise)]
        if not raised:
            continue
        bare = [replace(out[i], tol=undeclared[i].match, noise=undeclared[i].noise)
                for i in members]
        entry = _entry(bare)
        if entry is None or math.isnan(bare[entry].error):
            continue
        reason = _first_layer_agreed(bare, entry) or (
            _no_weights_op(bare, entry) if quantized_only else None)
        if reason is None:
            continue
        if not steps:
            why = reason
        steps.append(step)
        held += len(raised)
        for i, p in zip(members, bare):
            out[i] = p
    if not steps:
        return out, None
    return out, PrecisionCheck({k: v for k, v in declared.items() if v}, tuple(steps), why,
                               held)
