"""The generation check's result: per prompt, free-running and teacher-forced agreement, garbage
flags and, at a real split, the tensor comparison that localizes it. Frozen, numpy only."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Mapping, Sequence

import numpy as np

from .decode_check import DecodeCheck
from .garbage import GarbageFlag, candidate_only, detect
from .metrics import (
    MAX_KL,
    NEAR_TIE,
    KLStats,
    StepCompare,
    StepSummary,
    compare_step,
    compare_steps,
    summarize,
)
from .prompts import Prompt

if TYPE_CHECKING:
    from ..compare.comparison import Comparison

__all__ = ["FreeRun", "GenerationResult", "Localization", "PromptResult", "Settings", "Side",
           "Timing", "analyze_prompt"]


@dataclass(frozen=True)
class Settings:
    """What the check ran with and the thresholds it judged by."""

    max_new_tokens: int  #: greedy tokens per prompt
    top_k: int = 5  #: for top-k overlap and closeness
    near_tie: float = NEAR_TIE  #: a split with both gaps within this (nats) is a near-tie
    max_kl: float = MAX_KL  #: a prompt whose mean KL exceeds this (nats) diverges


@dataclass(frozen=True)
class Side:
    """One engine of the check."""

    spec: str  #: the engine spec (``hf:DIR``, ``llamacpp:FILE.gguf``, ...)
    meta: Mapping[str, Any] = field(default_factory=dict)  #: the engine's run metadata


@dataclass(frozen=True)
class FreeRun:
    """Free-running greedy decoding: each side fed its own tokens."""

    ref_tokens: tuple[int, ...]
    cand_tokens: tuple[int, ...]
    split: StepCompare | None  #: the first step whose tokens differ, classified
    ref_text: str | None  #: both outputs decoded by the reference's tokenizer (None: no
    cand_text: str | None  #: tokenizer that can decode)

    @property
    def split_step(self) -> int | None:
        return self.split.step if self.split is not None else None

    @property
    def shared(self) -> int:
        """How many leading tokens both sides generated alike."""
        return self.split.step if self.split is not None else len(self.ref_tokens)


@dataclass(frozen=True)
class Localization:
    """The tensor comparison run at a prompt's first real split (``lockstep diff`` there)."""

    step: int  #: the decode step compared (the prefill is step 0)
    out: str  #: the directory holding reference.lsd and candidate.lsd
    comparison: Comparison | None  #: verdict and first divergence; None when it could not run
    error: str | None = None  #: why it could not run


@dataclass(frozen=True)
class PromptResult:
    """One prompt's check."""

    index: int
    prompt: Prompt
    prompt_ids: tuple[int, ...]  #: the reference's token ids, fed to both sides
    free: FreeRun
    steps: tuple[StepCompare, ...]  #: teacher-forced: the candidate fed the reference's tokens
    summary: StepSummary  #: of ``steps``
    kl_step: int | None  #: the first step over the KL limit, when the prompt's mean KL is over
    reference_flags: tuple[GarbageFlag, ...]  #: symptoms in the reference's output
    candidate_flags: tuple[GarbageFlag, ...]  #: symptoms in the candidate's output
    localization: Localization | None = None
    pieces: Mapping[int, str] = field(default_factory=dict)  #: text of the tokens at splits
    decode_check: DecodeCheck | None = None  #: decode step 1 against the candidate's prefill

    @property
    def garbage(self) -> tuple[GarbageFlag, ...]:
        """The candidate's symptoms that the reference does not share."""
        return candidate_only(self.candidate_flags, self.reference_flags)

    @property
    def split_step(self) -> int | None:
        """The first step where the tokens part for a reason that is not a near-tie."""
        found = [s for s in (self.summary.first_split,
                             self.free.split_step if self.free.split is not None
                             and self.free.split.split else None) if s is not None]
        return min(found) if found else None

    @property
    def diverged_step(self) -> int | None:
        """The first step showing a bug: a real split, a step over the KL limit, or decode
        step 1 unlike the candidate's own prefill."""
        broken = 1 if self.decode_check is not None and self.decode_check.broken else None
        found = [s for s in (self.split_step, self.kl_step, broken) if s is not None]
        return min(found) if found else None

    @property
    def comparison(self) -> Comparison | None:
        return self.localization.comparison if self.localization is not None else None

    @property
    def ok(self) -> bool:
        """No real split, the mean KL within its limit, and no garbage."""
        return self.diverged_step is None and not self.garbage


@dataclass(frozen=True)
class Timing:
    """Where the check's time went, in seconds."""

    load_s: float  #: loading both engines
    reference_s: float  #: inside the reference's ``decode_logits``
    candidate_s: float  #: inside the candidate's ``decode_logits``
    localize_s: float  #: recording and comparing tensors at real splits
    total_s: float

    @property
    def engine_s(self) -> float:
        """Inside both engines' ``decode_logits``."""
        return self.reference_s + self.candidate_s

    @property
    def overhead_s(self) -> float:
        """Everything but the engines' decoding: loading, metrics, localization."""
        return self.total_s - self.engine_s


@dataclass(frozen=True)
class GenerationResult:
    """The generation check of a candidate engine against a reference. Truthy when no prompt
    has a real split, a mean KL over the limit or garbage."""

    reference: Side
    candidate: Side
    settings: Settings
    prompts: tuple[PromptResult, ...]
    timing: Timing

    def __bool__(self) -> bool:
        return all(p.ok for p in self.prompts)

    @property
    def summary(self) -> StepSummary:
        """Teacher-forced agreement over every step of every prompt."""
        return summarize([s for p in self.prompts for s in p.steps])

    @property
    def kl(self) -> KLStats:
        return self.summary.kl


def _first_difference(a: Sequence[int], b: Sequence[int]) -> int | None:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), None)


def analyze_prompt(index: int, prompt: Prompt, prompt_ids: Sequence[int], *,
                   ref_tokens: Sequence[int], ref_logits: np.ndarray,
                   cand_tokens: Sequence[int], cand_logits: np.ndarray,
                   forced_tokens: Sequence[int], forced_logits: np.ndarray,
                   texts: Mapping[str, str | None] | None = None,
                   settings: Settings | None = None) -> PromptResult:
    """Build one prompt's result from both sides' tokens and logits: free-running (each side
    its own tokens) and the candidate teacher-forced with the reference's tokens.

    ``texts`` holds the decoded outputs when a tokenizer can decode: ``ref``, ``cand`` (for
    display) and ``ref_plain``, ``cand_plain`` (special tokens skipped, for the empty check).
    """
    texts = texts or {}
    cfg = settings or Settings(len(ref_tokens))
    top_k, near_tie = cfg.top_k, cfg.near_tie
    at = _first_difference(ref_tokens, cand_tokens)
    split = None if at is None else compare_step(
        ref_logits[at], cand_logits[at], ref_tokens[at], cand_tokens[at], step=at,
        top_k=top_k, near_tie=near_tie)
    free = FreeRun(tuple(int(t) for t in ref_tokens), tuple(int(t) for t in cand_tokens), split,
                   texts.get("ref"), texts.get("cand"))
    steps = compare_steps(ref_logits, forced_logits, ref_tokens=ref_tokens,
                          cand_tokens=forced_tokens, top_k=top_k, near_tie=near_tie)
    cand_runs = [cand_logits] if forced_logits is cand_logits else [cand_logits, forced_logits]
    vocab = max(np.shape(ref_logits)[-1], np.shape(cand_logits)[-1]) if len(ref_tokens) else None
    summary = summarize(steps)
    kl_step = None
    if summary.kl.count and summary.kl.mean > cfg.max_kl:
        kl_step = next(s.step for s in steps if s.kl > cfg.max_kl)
    return PromptResult(
        index=index, prompt=prompt, prompt_ids=tuple(int(i) for i in prompt_ids), free=free,
        steps=steps, summary=summary, kl_step=kl_step,
        reference_flags=detect(ref_tokens, [ref_logits], text=texts.get("ref_plain"),
                               vocab_size=vocab),
        candidate_flags=detect(cand_tokens, cand_runs, text=texts.get("cand_plain"),
                               vocab_size=vocab))
