"""The ``layout`` rule: the candidate equals the reference once reordered (a transpose, a
(T, H, D) <-> (H, T, D) reordering, interleaved <-> half-split RoPE order)."""

from __future__ import annotations

from ...align.kinds import Kind as K
from ...textfmt import fmt
from .. import evidence as ev
from ..case import Case, label
from .model import Diagnosis, make, rule

__all__ = ["layout"]

@rule("layout")
def layout(case: Case) -> Diagnosis | None:
    """The candidate equal to the reference once reordered (evidence.find_layout)."""
    f = case.first
    arrays = case.arrays(f)
    if arrays is None or case.role(f).op in (K.INPUT_IDS, K.POSITIONS):
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
    checks = (["the RoPE pair convention: interleaved (GGUF, Meta) vs half-split "
               "(transformers); Q/K weights permuted by a GGUF conversion"] if rope else
              [f"the indexing of the kernel that writes {label(f)}: a missing transpose or "
               "permute, heads and positions swapped, a GEMM transpose flag or leading "
               "dimension, strides of a non-contiguous view"])
    checks.append(f"if the layout is intended, declare it: a mapping-file entry with "
                  f"transform `{spec}` pairs the two")
    return make("layout", title, checks, evidence, transform=spec, candidate_fix=fix.spec,
                error_after=fix.error, stored=fix.stored, expected=fix.expected)
