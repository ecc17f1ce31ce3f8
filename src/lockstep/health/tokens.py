"""Hidden states that do not change between tokens: at a prefill, every position's row of
the embedding or of a layer output the same; at a decode step, the logits and layer outputs
equal to the step before's (the model is stuck)."""

from __future__ import annotations

import numpy as np

from ..align.kinds import Kind
from .flags import RED, Checked, CheckResult, Flag, steps_text
from .tally import Tally, relative
from .view import DumpView, Entry

__all__ = ["check_rows", "check_stuck"]


def check_rows(view: DumpView) -> CheckResult:
    """At each step that runs several different tokens, the embedding and each layer output:
    flagged when every row is the same."""
    tally = Tally()
    hits: list[Entry] = []
    for step in view.steps:
        fed = view.fed(step)
        if fed is not None and len(set(fed)) < 2:
            continue  # one token repeated: the same rows are right
        emb = view.first(step, Kind.EMBED)
        for e in ([emb] if emb else []) + list(view.layer_outputs(step).values()):
            rows = view.rows(e)
            if rows is None or rows.shape[0] < 2 or not np.isfinite(rows).all() or \
                    float(np.abs(rows).max()) == 0:
                continue
            if tally.add(relative(rows, np.broadcast_to(rows[0], rows.shape))):
                hits.append(e)
    flags = []
    if hits:
        e = hits[0]
        steps = tuple(sorted({h.step for h in hits}))
        flags.append(Flag("same_rows", RED, "hidden states do not change between tokens: "
                          f"every position's row is the same in {len(hits)} records "
                          f"({', '.join(h.name for h in hits[:4])}"
                          f"{' ...' if len(hits) > 4 else ''}; {steps_text(steps)}) while "
                          "different tokens were fed", step=e.step, record=e.name,
                          seq=e.record.seq, steps=steps,
                          figures={"records": len(hits),
                                   "names": [h.name for h in hits[:20]]}))
    return CheckResult(tuple(flags), Checked(
        tally.seen, {"smallest_row_difference": tally.smallest},
        "" if tally.seen else "no step of several tokens with data"))


def _compared(view: DumpView, step: int) -> list[tuple[Entry, Entry]]:
    """(this step's record, the step before's) for the logits and each layer output, where
    both hold data of one shape."""
    pairs = []
    logits = view.first(step, Kind.LOGITS), view.first(step - 1, Kind.LOGITS)
    now, before = view.layer_outputs(step), view.layer_outputs(step - 1)
    candidates = [logits] + [(now[k], before[k]) for k in now if k in before]
    for a, b in candidates:
        if a is not None and b is not None and a.record.shape == b.record.shape:
            pairs.append((a, b))
    return pairs


def check_stuck(view: DumpView) -> CheckResult:
    """Each decode step whose logits (else every layer output) equal the step before's;
    for stats-only records, whose statistics all are equal."""
    tally = Tally()
    stuck: list[tuple[int, Entry, int]] = []  # (step, the first equal record, how many equal)
    for step in view.steps:
        if step - 1 not in view.all_steps:
            continue
        pairs = _compared(view, step)
        equal = [a for a, b in pairs if tally.same(view, a, b)]
        logits_equal = bool(pairs) and pairs[0][0].op == Kind.LOGITS and pairs[0][0] in equal
        if equal and (logits_equal or len(equal) == len(pairs)):
            stuck.append((step, equal[0], len(equal)))
    flags = []
    if stuck:
        step, e, n = stuck[0]
        steps = tuple(s for s, _, _ in stuck)
        flags.append(Flag("stuck", RED, "the model is stuck: the logits and layer outputs of "
                          f"{steps_text(steps)} equal the step before's ({n} records equal at "
                          f"step {step}, first {e.name})", step=step, record=e.name,
                          seq=e.record.seq, steps=steps, figures={"equal_records": n}))
    return CheckResult(tuple(flags), Checked(
        tally.seen, {"smallest_step_difference": tally.smallest},
        "" if tally.seen else "no two steps with data to compare"))
