"""Batch inputs in the search: the check (the candidate runs the sequences as one batch, the
reference runs each alone, the gold standard), the reason a batch is skipped, shrinking a
failing batch, and localizing it with the batched tensor comparison (``diff --batch``)."""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable

from ..engines import Engine
from ..errors import LockstepError, UsageError
from ..generation.check import Clock, batch_ahead, run_prompt
from ..generation.prompts import Prompt
from ..generation.result import PromptResult, Settings
from .inputs import BatchInput, FuzzInput
from .result import Finding
from .shrink import shrink

__all__ = ["Skip", "check_batch", "localize_batch", "shrink_batch"]


@dataclass(frozen=True)
class Skip:
    """Why a batch input was not run: the candidate cannot run that batch (never a
    failure)."""

    reason: str


def check_batch(x: BatchInput, ref: Engine, cand: Engine,
                settings: Settings) -> list[PromptResult] | Skip:
    """Each sequence's generation check, the candidate's logits taken from one batched run
    (free-running and fed the reference's tokens) and the reference's from a run alone. A
    candidate that refuses the batch (it cannot batch, pad that side or schedule a late
    request) gives a ``Skip``; any other exception propagates."""
    if not cand.can_batch():
        return Skip(str(cand.no_batch()))
    clock = Clock()
    ids = [list(s) for s in x.sequences]
    try:
        batch_ahead(clock, ref, cand, ids, x.steps, {"padding": x.padding,
                                                     "join_at": x.join_at})
    except UsageError as exc:
        return Skip(f"{cand.spec}: {exc}" if cand.spec not in str(exc) else str(exc))
    return [run_prompt(i, Prompt(tokens=s), list(s), ref, cand, clock, settings)
            for i, s in enumerate(x.sequences)]


def shrink_batch(start: BatchInput, still_fails: Callable[[FuzzInput | BatchInput], bool],
                 *, budget: int = 80) -> tuple[FuzzInput | BatchInput, int]:
    """The smallest input reached from ``start``: sequences dropped one at a time (down to
    two), then each sequence tried alone: a failure it shows alone is a single-sequence
    failure, shrunk as one (a ``FuzzInput``); otherwise each sequence is shrunk in turn
    (``shrink``: fewer steps, shorter, simpler tokens) with the others kept. Deterministic;
    at most ``budget`` checks."""
    best, checks = start, 0
    dropped = True
    while dropped and len(best.sequences) > 2:
        dropped = False
        for i in range(len(best.sequences)):
            if checks >= budget:
                return best, checks
            checks += 1
            if still_fails(best.without(i)):
                best, dropped = best.without(i), True
                break
    for i in range(len(best.sequences)):
        if checks >= budget:
            return best, checks
        checks += 1
        if still_fails(best.alone(i)):
            small, more = shrink(best.alone(i), still_fails, budget=budget - checks)
            return small, checks + more
    count = len(best.sequences)
    for i in range(count):  # the budget left, shared among the sequences still to shrink
        share = (budget - checks) // (count - i)
        if share < 1:
            break

        def in_batch(y: FuzzInput, base: BatchInput = best, i: int = i) -> bool:
            return still_fails(base.replaced(i, y))

        small, more = shrink(best.alone(i), in_batch, budget=share)
        best, checks = best.replaced(i, small), checks + more
    return best, checks


def localize_batch(finding: Finding, reference: str, candidate: str, where: Path,
                   ref_options: dict[str, Any], cand_options: dict[str, Any]) -> Finding:
    """Record the reference on each sequence alone and the candidate on the batch up to the
    failing step (and at least to the join, so the late request still joins mid-decode),
    compare each sequence, and keep the first diverged sequence's first divergence and its
    batch diagnosis, with the sequences it names."""
    from ..workflows.batch import batch_diff

    x, step = finding.input, finding.failure.step
    assert isinstance(x, BatchInput) and step is not None
    try:
        found = batch_diff(reference, candidate, where, tokens=[list(s) for s in x.sequences],
                           decode=max(step, x.join_at or 0), padding=x.padding,
                           join_at=x.join_at, ref_options=ref_options,
                           cand_options=cand_options)
    except LockstepError as exc:
        return replace(finding, out=str(where), localize_error=str(exc))
    first = found.diverged[0] if found.diverged else None
    comparison = found.sequences[first] if first is not None else None
    div = comparison.first_divergence if comparison is not None else None
    diag = comparison.diagnosis if comparison is not None else None
    named = tuple(int(i) for i in diag.detail.get("sequences", ())) if diag else ()
    return finding.located(str(where), found.verdict, div, diag, sequence=first, named=named)
