"""Detectors for a broken engine's output: the symptoms seen before anyone reads a tensor.

Each detector looks at one side's generated tokens or logits and returns a ``GarbageFlag`` or
``None``. Pure numpy. A flag only means garbage when the reference does not show the same
symptom (a small model can loop on its own); :func:`candidate_only` applies that rule.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterable, Sequence

import numpy as np

__all__ = ["GarbageFlag", "candidate_only", "constant_output", "detect", "empty_output",
           "nonfinite_logits", "repetition_loop", "static_logits", "vocab_end"]

#: the share of the id range counted as "the end of the vocabulary"
VOCAB_END_FRACTION = 0.03
#: most generated tokens there: seed 004's transposed lm_head gave ids 150k+ of a 151k vocab
VOCAB_END_SHARE = 0.5
#: a loop must repeat its unit this often and cover this share of the output
LOOP_REPEATS = 3
LOOP_SHARE = 0.5
#: consecutive logit rows closer than this (relative to the row's scale) count as unchanged
STATIC_RTOL = 1e-6


@dataclass(frozen=True)
class GarbageFlag:
    """One symptom of garbage output."""

    kind: str  #: "nonfinite", "repetition", "vocab_end", "static_logits", "empty", "constant"
    step: int | None  #: the first step showing it, when one does
    detail: str  #: what was seen, with the values

    def __str__(self) -> str:
        return f"{self.kind}: {self.detail}"


def nonfinite_logits(logits: np.ndarray) -> GarbageFlag | None:
    """NaN or Inf anywhere in the logits (-Inf alone is a masked token, not garbage)."""
    x = np.atleast_2d(np.asarray(logits))
    nan = np.isnan(x)
    posinf = np.isposinf(x)
    bad_rows = np.flatnonzero((nan | posinf).any(axis=-1) | np.isneginf(x).all(axis=-1))
    if not bad_rows.size:
        return None
    return GarbageFlag("nonfinite", int(bad_rows[0]),
                       f"{bad_rows.size} of {x.shape[0]} steps have NaN or Inf logits "
                       f"({int(nan.sum())} NaN, {int(posinf.sum())} +Inf), first at step "
                       f"{int(bad_rows[0])}")


def constant_output(tokens: Sequence[int], *, min_tokens: int = 3) -> GarbageFlag | None:
    """Every generated token is the same one."""
    if len(tokens) < min_tokens or len(set(tokens)) != 1:
        return None
    return GarbageFlag("constant", 0, f"all {len(tokens)} tokens are {tokens[0]}")


def empty_output(tokens: Sequence[int], text: str | None) -> GarbageFlag | None:
    """No tokens, or tokens that decode to nothing but whitespace and special tokens
    (``text`` decoded with special tokens skipped; None when no tokenizer can decode)."""
    if not tokens:
        return GarbageFlag("empty", None, "no tokens generated")
    if text is not None and not text.strip():
        return GarbageFlag("empty", 0, f"{len(tokens)} tokens decode to "
                                       f"{'nothing' if not text else 'whitespace only'}")
    return None


def repetition_loop(tokens: Sequence[int], *, repeats: int = LOOP_REPEATS,
                    share: float = LOOP_SHARE) -> GarbageFlag | None:
    """The output ends in a loop: a unit of tokens repeated at least ``repeats`` times,
    covering at least ``share`` of the output (the shortest such unit is reported)."""
    t = list(tokens)
    n = len(t)
    for period in range(1, n // repeats + 1):
        # length of the tail in which every token equals the one a period earlier
        run = 0
        while run < n - period and t[n - 1 - run] == t[n - 1 - run - period]:
            run += 1
        span = run + period
        if span // period >= repeats and span >= share * n:
            unit = t[n - period:]
            return GarbageFlag("repetition", n - span,
                               f"the last {span} of {n} tokens repeat {unit} "
                               f"{span / period:.3g} times, from step {n - span}")
    return None


def vocab_end(tokens: Sequence[int], vocab_size: int, *, fraction: float = VOCAB_END_FRACTION,
              share: float = VOCAB_END_SHARE) -> GarbageFlag | None:
    """Most generated ids in the top ``fraction`` of the id range (a wrong lm_head layout)."""
    if not tokens or vocab_size <= 0:
        return None
    start = math.floor(vocab_size * (1.0 - fraction))
    hits = [i for i, tok in enumerate(tokens) if tok >= start]
    if len(hits) < 2 or len(hits) < share * len(tokens):
        return None
    return GarbageFlag("vocab_end", hits[0],
                       f"{len(hits)} of {len(tokens)} tokens are ids >= {start}, the last "
                       f"{fraction:.0%} of a {vocab_size}-token vocabulary")


def static_logits(logits: np.ndarray, *, rtol: float = STATIC_RTOL) -> GarbageFlag | None:
    """The logits do not change from one step to the next (for at least half of the steps):
    the model ignores its input (a stuck hidden state, a cache read instead of written)."""
    x = np.atleast_2d(np.asarray(logits, dtype=np.float64))
    finite = np.asarray(np.isfinite(x).all(axis=-1))
    pairs = np.flatnonzero(finite[:-1] & finite[1:])  # non-finite rows are nonfinite's case
    if not pairs.size:
        return None
    change = np.abs(x[pairs + 1] - x[pairs]).max(axis=-1)
    scale = np.abs(x[pairs + 1]).max(axis=-1)
    static = pairs[change <= rtol * np.maximum(scale, 1e-30)]
    if not static.size or static.size < pairs.size / 2:
        return None
    return GarbageFlag("static_logits", int(static[0]) + 1,
                       f"the logits do not change in {static.size} of {pairs.size} "
                       f"steps, first from step {int(static[0])} to {int(static[0]) + 1}")


def detect(tokens: Sequence[int], logits: Iterable[np.ndarray], *, text: str | None = None,
           vocab_size: int | None = None) -> tuple[GarbageFlag, ...]:
    """Every detector on one side's output: its generated ``tokens`` (free-running), the
    logit arrays of each of its runs, and its text (special tokens skipped) when known."""
    flags: list[GarbageFlag | None] = []
    for rows in logits:
        rows = np.atleast_2d(np.asarray(rows))
        flags += [nonfinite_logits(rows), static_logits(rows)]
        vocab_size = vocab_size or rows.shape[-1]
    constant = constant_output(tokens)
    flags += [empty_output(tokens, text), constant,
              None if constant else repetition_loop(tokens),
              vocab_end(tokens, vocab_size) if vocab_size else None]
    seen: dict[str, GarbageFlag] = {}
    for flag in flags:
        if flag is not None and flag.kind not in seen:  # one flag per kind, the first run's
            seen[flag.kind] = flag
    return tuple(seen.values())


def candidate_only(candidate: Sequence[GarbageFlag],
                   reference: Sequence[GarbageFlag]) -> tuple[GarbageFlag, ...]:
    """The candidate's flags whose kind the reference does not show (those are the engine's,
    not the model's); a loop or a constant output on both sides counts as the model's."""
    family = {"repetition": "loop", "constant": "loop"}
    ref_kinds = {family.get(f.kind, f.kind) for f in reference}
    return tuple(f for f in candidate if family.get(f.kind, f.kind) not in ref_kinds)
