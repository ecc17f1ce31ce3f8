"""The ``logits`` rule: the logits differ while the final norm agrees."""

from __future__ import annotations

from typing import Any

from ...align.kinds import Kind as K
from ...textfmt import fmt
from .. import evidence as ev
from ..case import Case, label
from .model import Diagnosis, make, rule

__all__ = ["logits"]

_ROW_CHECKS = ("the row each sequence's logits are computed from: its last token "
               "(vLLM's logits_indices, query_start_loc[1:] - 1; SGLang's pruned states), "
               "not its first, and not one past it",
               "a padded batch: the last real column of each row, not the last column",
               "a prefill fed in chunks: the logits of the last chunk's last token")


def _other_row(case: Case) -> tuple[int, int, float] | None:
    """(row, rows, error) where the candidate's one logits row is the reference's at a token
    other than the last: the logits were taken from the wrong token."""
    f = case.first
    arrays = case.arrays(f)
    full = case.read(case.ref, case.ref_record(f), None)
    if arrays is None or full is None or f.ref_transform is None or \
            not f.ref_transform.startswith("block("):
        return None
    cand = arrays[1].reshape(-1)
    if full.size % cand.size or full.size // cand.size < 2:
        return None
    rows = full.reshape(-1, cand.size)
    best = ev.match_row(rows[:-1], cand, case.good())
    err = ev.rel_error(rows[best], cand) if best is not None else None
    return (best, len(rows), err) if best is not None and err is not None and \
        case.explains(err) else None


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
    row = _other_row(case)
    if row is not None:
        k, rows, err = row
        evidence.append(f"the candidate's logits are the reference's at token {k} of the "
                        f"step's {rows} (relative L2 {fmt(err)}), not at its last, token "
                        f"{rows - 1}")
        return make("logits", f"the logits are taken from token {k} of {rows}, not the last "
                    "one: the row the next token is computed from", _ROW_CHECKS, evidence,
                    **detail, row=k, rows=rows, row_error=err)
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
