"""The ``op`` rule, the fallback: an op's output differs while its input agrees."""

from __future__ import annotations

from typing import Any

from ...align.kinds import Kind as K
from ...textfmt import fmt
from .. import evidence as ev
from ..case import Case, input_sentence, label
from ..ops import NORMS
from ..pair_result import DRIFT_FACTOR
from .model import Diagnosis, make, rule

__all__ = ["op"]

_OP_CHECKS: dict[str, str] = {
    "attn_heads": "the attention kernel: causal mask, softmax scale 1/sqrt(head_dim), the "
                  "query-head to KV-head mapping (GQA), attention rows summing to 1",
    "act": "the activation: SiLU vs GELU, gate and up swapped",
    "norm": "the norm: eps, the weight (and a 1+w offset), computed in float32, over the "
            "whole hidden size",
    "out": "the residual adds: the layer's output is its input plus its attention and MLP "
           "outputs (vLLM and SGLang: the (hidden, residual) it returns, added by the next "
           "norm)",
}


def _returns_its_input(case: Case) -> tuple[Any, float] | None:
    """(the pair of the layer's input, the gap) where the first divergence is a layer's
    output and the candidate's equals the reference's input of that layer: the output of the
    layer before (or the embedding's)."""
    f = case.first
    role = case.role(f)
    if role.op != K.OUT or role.layer is None:
        return None
    prev = case.layer_input(role.layer)
    ours, theirs = case.arrays(f), case.arrays(prev) if prev is not None else None
    if ours is None or theirs is None or theirs[0].size != ours[1].size:
        return None
    gap = ev.rel_error(theirs[0].reshape(ours[1].shape), ours[1])
    return (prev, gap) if case.explains(gap) else None


@rule("op")
def op(case: Case) -> Diagnosis:
    """The fallback: the op's output differs while its input agrees; a scale, or the few
    output features that differ."""
    f = case.first
    role = case.role(f)
    sentence, inp = input_sentence(case, f)
    evidence = [sentence, f"its output {label(f)} at step {f.step}: relative L2 "
                f"{fmt(f.error)} (inherited {fmt(f.inherited)})"]
    detail: dict[str, Any] = {"input": label(inp) if inp is not None else None,
                              "input_error": inp.error if inp is not None else None,
                              "output_error": f.error, "op": role.op or None}
    checks = [f"the weights of {label(f)}: loaded, the right tensor, dtype and "
              "dequantization (`lockstep weights`)",
              f"the kernel of {label(f)}: run it alone on the reference's input"]
    title = f"{label(f)} differs while its input agrees: the op's weights or kernel"
    if inp is not None and not case.agrees(inp):
        title = f"the error grows at {label(f)} from an input that already differs"
    arrays = case.arrays(f)
    if arrays is not None:
        s, res = ev.fit_scale(*arrays)
        if case.explains(res) and abs(s - 1) > 1e-3:
            detail["scale"] = s
            evidence.append(f"the candidate is {fmt(s)} x the reference everywhere "
                            f"(residual {fmt(res)})")
            title = f"{label(f)} is {fmt(s)} x the reference's while its input agrees"
            checks.insert(0, "a scale factor: a norm or layer-scale weight, an adapter's "
                          "alpha/rank, a dequantization scale, a residual multiplier")
        count, where = ev.confined(*arrays, max(DRIFT_FACTOR * f.noise, 1e-6))
        shape = ev.squeeze(arrays[0]).shape
        for axis, idx in where:
            if axis == len(shape) - 1:
                detail["features"] = list(idx)
                evidence.append(f"only features {list(idx)} of {shape[axis]} differ "
                                f"({count} elements)")
                checks.insert(0, f"rows {list(idx)} of the weight of {label(f)} (a corrupted "
                              "or misloaded slice)")
    dropped = _returns_its_input(case) if arrays is not None else None
    if dropped is not None:
        prev, gap = dropped
        detail["equals_input"] = label(prev)
        title = (f"layer {role.layer}'s output {label(f)} is its input, the reference's "
                 f"{label(prev)}: the layer's result is dropped")
        evidence.append(f"the candidate's {label(f)} equals the reference's {label(prev)} "
                        f"(relative L2 {fmt(gap)})")
        checks.insert(0, f"what layer {role.layer} returns: its result, not its input (a "
                      "layer skipped, a result assigned to the wrong variable)")
    extra = _OP_CHECKS.get("norm" if role.op in NORMS else role.op)
    if extra:
        checks.insert(1, extra)
    return make("op", title, checks, evidence, **detail)
