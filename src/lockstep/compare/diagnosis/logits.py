"""The ``logits`` rule: the logits differ while the final norm agrees."""

from __future__ import annotations

from typing import Any

from ...align.kinds import Kind as K
from ...textfmt import fmt
from .. import evidence as ev
from ..case import Case, label
from .model import Diagnosis, make, rule

__all__ = ["logits"]

@rule("logits")
def logits(case: Case) -> Diagnosis | None:
    """The logits differ while the final norm agrees: where the top tokens fall, a scale."""
    f = case.first
    if case.role(f).op != K.LOGITS:
        return None
    norm = case.find((K.FINAL_NORM,), None)
    if norm is not None and not case.agrees(norm):
        return None
    arrays = case.arrays(f)
    evidence = [f"the final norm {label(norm)} agrees (relative L2 {fmt(norm.error)}); the "
                f"logits differ ({fmt(f.error)})" if norm is not None else
                "the final norm's output was not captured"]
    detail: dict[str, Any] = {"final_norm_error": norm.error if norm is not None else None}
    bunched = False
    if arrays is not None:
        tail_c, top_c = ev.argmax_tail(arrays[1])
        tail_r, _ = ev.argmax_tail(arrays[0])
        vocab = ev.squeeze(arrays[0]).shape[-1]
        bunched = tail_c >= 0.75 and tail_c >= tail_r + 0.25
        evidence.append(f"the candidate's top token is in the last quarter of the vocabulary "
                        f"(ids >= {int(0.75 * vocab)} of {vocab}) at {100 * tail_c:.3g}% of "
                        f"positions (ids {list(top_c[:8])}), the reference's at "
                        f"{100 * tail_r:.3g}%")
        detail.update(argmax_tail_candidate=tail_c, argmax_tail_reference=tail_r,
                      candidate_argmax=list(top_c[:16]))
        s = case.scale_of(arrays)
        if s is not None:
            evidence.append(f"the candidate's logits are {fmt(s)} x the reference's")
            detail["scale"] = s
    checks = ["the lm_head GEMM: transpose flag and leading dimension for a row-major "
              "[vocab, hidden] weight (cuBLAS is column-major)",
              "which weight: lm_head vs the tied embed_tokens (tie_word_embeddings), loaded "
              "at all (`lockstep weights`)",
              "the buffer fed to lm_head is the final norm's output",
              "the vocabulary size and padding, logit scaling or soft-capping"]
    if "scale" in detail:
        checks.insert(0, "a logit scale: temperature, logit_scale, soft-capping")
    title = ("the candidate's top tokens bunch at the end of the vocabulary while the final "
             "norm agrees: the lm_head weight is read in the wrong layout" if bunched else
             "the logits differ while the final norm agrees: the lm_head weight or its "
             "layout")
    return make("logits", title, checks, evidence, **detail)
