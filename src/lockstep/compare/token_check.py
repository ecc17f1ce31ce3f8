"""The chosen tokens of both runs as the comparison found them (``tokens.check_tokens``):
where they first differ, and the steps where a greedy candidate's token is off its own
argmax."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..jsontext import json_number

__all__ = ["OffArgmax", "TokenCheck"]


@dataclass(frozen=True)
class OffArgmax:
    """A step where the candidate's chosen token is not the argmax of its own logits."""

    step: int
    chosen: int
    argmax: int
    gap: float  #: the argmax's logit minus the chosen token's (inf: chosen outside the
    #: vocab; nan: the chosen token's logit is NaN)
    logits: str  #: the candidate record the logits were read from


@dataclass(frozen=True)
class TokenCheck:
    """Each side's chosen tokens, where they first differ, and the candidate's off-argmax
    steps."""

    reference: tuple[int, ...] | None  #: the reference's generated_token_ids
    candidate: tuple[int, ...] | None
    split: int | None  #: the first step where the two sides chose different tokens
    off_argmax: tuple[OffArgmax, ...]

    @property
    def first_problem(self) -> int | None:
        """The first step at which the tokens tell of a problem."""
        steps = [o.step for o in self.off_argmax] + ([self.split] if self.split is not None
                                                     else [])
        return min(steps, default=None)

    def as_dict(self) -> dict[str, Any]:
        return {"reference": list(self.reference) if self.reference is not None else None,
                "candidate": list(self.candidate) if self.candidate is not None else None,
                "split": self.split,
                "off_argmax": [{"step": o.step, "chosen": o.chosen, "argmax": o.argmax,
                                "gap": json_number(o.gap),
                                "logits": o.logits} for o in self.off_argmax]}
