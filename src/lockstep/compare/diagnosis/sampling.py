"""The ``sampling`` diagnosis: the logits agree, the token does not. The candidate's chosen
token is not the argmax of its own logits (greedy decoding), or the two sides chose different
tokens while their logits agree: the logits-to-token step (temperature, the sampler, how the
token is stored) is wrong, not the model."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

from ...align.kinds import Kind as K
from ...textfmt import fmt
from ..case import Case, label
from .model import Diagnosis, make, rule

if TYPE_CHECKING:
    from ..token_check import TokenCheck

__all__ = ["sampling", "sampling_diagnosis"]

_CHECKS = ("greedy decoding takes the argmax of the logits: a temperature of 0 must skip the "
           "division by the temperature (dividing by 0 gives +-inf, and argmax picks the first "
           "of them)",
           "how the chosen token is kept: a Python int appended after sampling, not a view of "
           "the sampler's reused output buffer",
           "the logits row the token is taken from: the last position of this step, the "
           "right sequence of the batch")


def sampling_diagnosis(tokens: TokenCheck, step: int, logits: str | None = None,
                       error: float | None = None) -> Diagnosis | None:
    """The diagnosis for the tokens at ``step``; None when they tell of no problem there."""
    off = next((o for o in tokens.off_argmax if o.step == step), None)
    evidence = []
    if logits is not None and error is not None:
        evidence.append(f"the logits agree at step {step} ({logits}: relative L2 "
                        f"{fmt(error)})")
    detail: dict[str, Any] = {"step": step}
    if off is not None:
        title = (f"at step {step} the candidate chose token {off.chosen}, not the argmax "
                 f"{off.argmax} of its own logits: the logits-to-token step is wrong")
        if math.isnan(off.gap):
            evidence.append(f"the candidate's {off.logits} at step {step} hold NaN for the "
                            f"token it chose, {off.chosen}; their argmax is {off.argmax}")
        else:
            evidence.append(f"the candidate's {off.logits} at step {step} prefer token "
                            f"{off.argmax} by {fmt(off.gap)} over the token it chose, "
                            f"{off.chosen}")
        others = [o.step for o in tokens.off_argmax if o.step != step]
        if others:
            evidence.append(f"its chosen token is off its argmax at steps {others} too")
        detail.update(chosen=off.chosen, argmax=off.argmax, gap=off.gap, logits=off.logits,
                      steps=[o.step for o in tokens.off_argmax])
    elif tokens.split == step and tokens.reference and tokens.candidate:
        ref_tok, cand_tok = tokens.reference[step], tokens.candidate[step]
        title = (f"at step {step} the two sides chose different tokens ({ref_tok} and "
                 f"{cand_tok}) while their logits agree: the token choice, not the model")
        evidence.append(f"chosen tokens: reference {list(tokens.reference)}, candidate "
                        f"{list(tokens.candidate)}")
        detail.update(reference_token=ref_tok, candidate_token=cand_tok)
    else:
        return None
    return make("sampling", title, _CHECKS, evidence, **detail)


@rule("sampling")
def sampling(case: Case) -> Diagnosis | None:
    """The first divergence is a logits pair that agrees, and the tokens of its step are off
    (see the module docstring)."""
    f, tokens = case.first, case.tokens
    if tokens is None or case.role(f).op != K.LOGITS or not case.agrees(f):
        return None
    return sampling_diagnosis(tokens, f.step, label(f), f.error)
