"""Whether a divergence is the candidate's own precision, amplified by the input: measured.

Some inputs make a model amplify small errors: a token whose residual stream grows a massive
activation, where an RMSNorm's output swings with that one element. An engine that computes
in lower precision than the reference (llama.cpp's CPU dot products quantize activations to 8
bits in blocks of 32) then parts from the reference on that input, with no bug anywhere. The
comparison sees errors that grow out of bounds with no jump: no tensor's error is far above
what it inherited.

For such a divergence the dual test runs on every op over tolerance that a module of the
reference outputs, in every step that has one (``replay_comparison(every=True)``, one
targeted pass per step: a bug that starts at a later step can inherit enough of the amplified
error to show no jump there). The divergence is the
candidate's precision, amplified, when all of these hold:

* the comparison found no jump, and the tokens did not part where the tensors agree;
* at least one op was replayed, and no replayed op introduces an error of its own (at least
  half of its pair's error) beyond twice what rounding its operands gives (bfloat16, float16,
  or its weight's GGUF type with 8-bit blocked input);
* no pair over tolerance that could not be replayed (attention, rotary embeddings, inputs
  of ops) grew its error more than ``GROWTH`` times the largest before it in the step.

Otherwise the divergence stands. Nothing here is declared: every figure is measured.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any, Sequence

from ..compare.pair_result import decide
from .run import Replay, replay_comparison

__all__ = ["Amplified", "GROWTH", "audit_amplification"]

#: a pair the replay could not re-run may grow its error this many times the largest before
#: it in the step (a jump is 10x): more could be an error introduced where nothing measured it
GROWTH = 3.0


@dataclass(frozen=True)
class Amplified:
    """The audit of a divergence with no jump."""

    explained: bool  #: True: the candidate's precision, amplified by the input
    replayed: int  #: ops re-run on the candidate's inputs
    by_rounding: int  #: of those, ops whose own error a rounding explains
    unreplayed: int  #: pairs over tolerance no module outputs (attention, rope, inputs)
    why: str  #: one line: what decided it
    seconds: float = 0.0

    def to_json(self) -> dict[str, Any]:
        return {"explained": self.explained, "replayed": self.replayed,
                "by_rounding": self.by_rounding, "unreplayed": self.unreplayed,
                "why": self.why, "seconds": round(self.seconds, 3)}


def applies(comparison: Any) -> bool:
    """A divergence grown out of bounds with no jump, found by the tensors (not by the
    tokens alone: a greedy token off the candidate's own argmax is never precision)."""
    if comparison.verdict != "diverged" or comparison.first_divergence is None:
        return False
    if any(p.jump for p in comparison.results):
        return False
    tokens = comparison.tokens
    if tokens is not None and tokens.off_argmax:
        return False
    measured = [p for p in comparison.results if not math.isnan(p.error)]
    return decide(measured)[0] == "diverged"


def audit_amplification(engine: Any, comparison: Any, prompt_ids: Sequence[int],
                        forced: Sequence[int] | None) -> Amplified | None:
    """The audit (see the module docstring) of ``comparison`` with ``engine``, the
    reference loaded with its module tree; None when the divergence has a jump (or none)."""
    if not applies(comparison):
        return None
    t0 = time.perf_counter()
    # every step with a pair over tolerance: a bug that starts at a later step may inherit
    # enough of the amplified error to show no jump there
    firsts: dict[int, Any] = {}
    for p in comparison.results:
        if p.over and not math.isnan(p.error):
            firsts.setdefault(p.step, p)
    ops = []
    for first in firsts.values():
        replay: Replay = replay_comparison(engine, comparison, prompt_ids, forced, at=first,
                                           every=True)
        ops += replay.ops
    ran = [op for op in ops if op.introduced is not None]
    own = [op for op in ran if op.where == "introduced" and not op.explained_by]
    rounded = sum(1 for op in ran if op.explained_by)
    # the pairs over tolerance no op was re-run for: no module outputs them, the module reads
    # more than its input, or its input was not found
    replayed = {(op.step, op.reference) for op in ran}
    others = [p for p in comparison.results if p.over and not math.isnan(p.error)
              and (p.step, p.ref_name) not in replayed]
    grown = [p for p in others if p.growth > GROWTH]
    if not ran:
        why = "no op over tolerance could be replayed: precision cannot be told from a bug"
    elif own:
        op = own[0]
        why = (f"{op.reference} introduces an error of its own ({op.introduced:.3g}) beyond "
               f"what rounding its operands gives ({_roundings(op.rounding)}), at step "
               f"{op.step}")
    elif grown:
        p = grown[0]
        why = (f"{p.ref_name} grows its error {p.growth:.3g}x at step {p.step}, where no op "
               "could be replayed "
               "to tell precision from a bug")
    else:
        why = (f"every one of the {len(ran)} ops replayed inherits its error or introduces no "
               f"more than rounding its operands gives ({rounded} by rounding); the "
               f"{len(others)} pairs that could not be replayed grow it at most {GROWTH:g}x: "
               "the model amplifies the candidate's precision on this input")
    return Amplified(explained=bool(ran) and not own and not grown, replayed=len(ran),
                     by_rounding=rounded, unreplayed=len(others), why=why,
                     seconds=time.perf_counter() - t0)


def _roundings(rounding: dict[str, float]) -> str:
    return ", ".join(f"{k} {v:.3g}" for k, v in sorted(rounding.items(), key=lambda kv: kv[1])) \
        or "no rounding applies"
