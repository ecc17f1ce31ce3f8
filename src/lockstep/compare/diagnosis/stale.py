"""The ``stale`` rule: the candidate equals its own value at the previous step while the
reference moved (not updated)."""

from __future__ import annotations

from ...align.kinds import Kind as K
from ...textfmt import fmt
from .. import evidence as ev
from ..case import Case, label
from ..ops import ROPE_TABLES
from .model import Diagnosis, make, rule

__all__ = ["stale"]

@rule("stale")
def stale(case: Case) -> Diagnosis | None:
    """The candidate's tensor equal to its own value at the previous step, the reference's
    not (a prefill's value: its last position)."""
    f = case.first
    if f.step == 0 or case.role(f).op in (K.INPUT_IDS, K.POSITIONS, K.EMBED, *ROPE_TABLES):
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
