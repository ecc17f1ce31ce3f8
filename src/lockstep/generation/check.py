"""The generation check: greedy decoding on a reference and a candidate engine, token by token.

Both engines are loaded once. For each prompt the reference tokenizes it (or applies its chat
template) and the candidate gets exactly those ids. The reference decodes greedily; the
candidate decodes greedily on its own (free-running) and, when its tokens part from the
reference's, again fed the reference's tokens (teacher-forced), so every step compares two
next-token distributions given the same input. At a prompt's first real split (not a
near-tie) both engines are recorded up to that step and their tensors compared
(``lockstep diff``), which names the first divergent tensor.
"""

from __future__ import annotations

import time
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from ..engines import Engine, open_engine
from ..errors import LockstepError, UsageError
from .decode_check import check_decode
from .metrics import MAX_KL, NEAR_TIE
from .prompts import Prompt, as_prompts
from .result import (
    GenerationResult,
    Localization,
    PromptResult,
    Settings,
    Side,
    Timing,
    analyze_prompt,
)

__all__ = ["Clock", "batch_ahead", "check_generation", "run_prompt"]


class Clock:
    """Seconds spent inside each engine's decode_logits."""

    def __init__(self) -> None:
        self.seconds: dict[int, float] = {}
        #: runs done ahead, as one batch: (engine, prompt, steps, forced) -> tokens, logits
        self.done: dict[tuple[int, tuple[int, ...], int, tuple[int, ...] | None],
                        tuple[list[int], np.ndarray]] = {}

    def decode(self, engine: Engine, ids: Sequence[int], steps: int,
               forced: Sequence[int] | None = None) -> tuple[list[int], np.ndarray]:
        key = (id(engine), tuple(ids), steps, None if forced is None else tuple(forced))
        if key in self.done:
            return self.done[key]
        t0 = time.perf_counter()
        tokens, logits = engine.decode_logits(ids, steps, forced=forced)
        self.seconds[id(engine)] = self.seconds.get(id(engine), 0.0) + time.perf_counter() - t0
        logits = np.asarray(logits)
        if logits.ndim != 2 or logits.shape[0] != steps or len(tokens) != steps:
            raise LockstepError(f"{engine.spec}: decode_logits returned {len(tokens)} tokens "
                                f"and logits of shape {logits.shape}, expected {steps} tokens "
                                f"and ({steps}, vocab)")
        return [int(t) for t in tokens], logits


def batch_ahead(clock: Clock, ref: Engine, cand: Engine, ids: list[list[int]], steps: int,
                batch: dict[str, Any]) -> None:
    """Run the candidate on every prompt as one batch, free-running and fed the reference's
    tokens, and keep the runs for the per-prompt check (the reference runs each alone, kept
    too)."""
    from ..workflows.batch import join_steps

    joins = join_steps(len(ids), batch.get("join_at"))
    padding = str(batch.get("padding") or "left")
    ref_tokens = []
    for p in ids:
        run = clock.done[(id(ref), tuple(p), steps, None)] = clock.decode(ref, p, steps)
        ref_tokens.append(run[0])
    t0 = time.perf_counter()
    free = cand.decode_logits_batch(ids, steps, padding=padding, join_at=joins)
    fed = cand.decode_logits_batch(ids, steps, forced=ref_tokens, padding=padding,
                                   join_at=joins)
    clock.seconds[id(cand)] = clock.seconds.get(id(cand), 0.0) + time.perf_counter() - t0
    for p, tokens, run, forced_run in zip(ids, ref_tokens, free, fed):
        clock.done[(id(cand), tuple(p), steps, None)] = run
        clock.done[(id(cand), tuple(p), steps, tuple(tokens))] = forced_run


def _localize_batch(results: list[PromptResult], ref_spec: str, cand_spec: str, out: Path,
                    ref_options: dict[str, Any], cand_options: dict[str, Any],
                    batch: dict[str, Any], announce: Callable[[str], Any],
                    mapping: Any = None) -> list[PromptResult]:
    """Record the reference on each prompt alone and the candidate on all as one batch, up
    to the last first split, and give each diverged prompt its sequence's comparison."""
    from ..workflows.batch import batch_diff

    steps = [r.diverged_step for r in results if r.diverged_step is not None]
    if not steps:
        return results
    where = out / "batch"
    announce(f"lockstep: {len(steps)} prompts diverge in the batch: recording both engines up "
             f"to step {max(steps)} into {where}")
    try:
        found = batch_diff(ref_spec, cand_spec, where, tokens=[list(r.prompt_ids)
                                                                for r in results],
                           decode=max(steps), padding=str(batch.get("padding") or "left"),
                           join_at=batch.get("join_at"), ref_options=ref_options,
                           cand_options=cand_options, mapping=mapping)
    except LockstepError as exc:
        return [r if r.diverged_step is None else replace(
            r, localization=Localization(r.diverged_step, str(where), None, str(exc)))
            for r in results]
    return [r if r.diverged_step is None else replace(
        r, localization=Localization(r.diverged_step, str(where), found.sequences[i]))
        for i, r in enumerate(results)]


def _prompt_ids(engine: Engine, prompt: Prompt, index: int) -> list[int]:
    """The reference's token ids for a prompt (chat template applied when asked)."""
    if prompt.tokens is not None:
        ids = list(prompt.tokens)
    else:
        messages = prompt.chat_messages()
        ids = engine.chat_tokens(messages) if messages is not None \
            else engine.tokenize(prompt.text or "")
    if not ids:
        raise UsageError(f"prompt {index + 1} ({prompt.label[:40]!r}) has no tokens")
    return [int(i) for i in ids]


def _texts(engine: Engine, ref: Sequence[int], cand: Sequence[int]) -> dict[str, str | None]:
    """Both outputs decoded by the reference: shown as they are, and without special tokens."""
    return {"ref": engine.detokenize(ref), "cand": engine.detokenize(cand),
            "ref_plain": engine.detokenize(ref, skip_special=True),
            "cand_plain": engine.detokenize(cand, skip_special=True)}


def run_prompt(index: int, prompt: Prompt, ids: list[int], ref: Engine, cand: Engine,
                clock: Clock, settings: Settings) -> PromptResult:
    """One prompt's check on loaded engines: free-running, teacher-forced, and decode step 1
    against the candidate's own prefill."""
    steps = settings.max_new_tokens
    ref_tokens, ref_logits = clock.decode(ref, ids, steps)
    cand_tokens, cand_logits = clock.decode(cand, ids, steps)
    if cand_tokens[:-1] == ref_tokens[:-1]:
        # the candidate was fed the reference's tokens anyway: teacher forcing changes nothing
        forced_tokens, forced_logits = cand_tokens, cand_logits
    else:
        forced_tokens, forced_logits = clock.decode(cand, ids, steps, forced=ref_tokens)
    result = analyze_prompt(index, prompt, ids, ref_tokens=ref_tokens, ref_logits=ref_logits,
                            cand_tokens=cand_tokens, cand_logits=cand_logits,
                            forced_tokens=forced_tokens, forced_logits=forced_logits,
                            texts=_texts(ref, ref_tokens, cand_tokens), settings=settings)
    if steps >= 2:  # the first decode step against the candidate's own prefill of it
        _, own = clock.decode(cand, list(ids) + ref_tokens[:1], 1)
        meta = cand.meta()
        full = str(meta.get("compute_dtype") or meta.get("dtype")) in ("float32", "float64")
        check = check_decode(own[0], forced_logits[1], prefill_kl=result.steps[0].kl,
                             full_precision=full)
        result = replace(result, decode_check=check)
    # the text of every token shown: both outputs, and each step's top-k on either side
    shown = [s for s in (result.free.split, *result.steps) if s is not None]
    wanted = {t for s in shown for t in (s.ref_token, s.cand_token)}
    wanted.update(t for s in shown for t, _ in (*s.ref_top, *s.cand_top))
    wanted.update(result.free.ref_tokens + result.free.cand_tokens)
    pieces = {t: text for t in sorted(wanted) if (text := ref.detokenize([t])) is not None}
    return replace(result, pieces=pieces)


def _localize(result: PromptResult, ref_spec: str, cand_spec: str, out: Path,
              ref_options: dict[str, Any], cand_options: dict[str, Any],
              announce: Callable[[str], Any], mapping: Any = None) -> PromptResult:
    """Record both engines up to the prompt's first real split (or first step over the KL
    limit) and compare their tensors."""
    from ..workflows.diff import diff

    step = result.diverged_step
    assert step is not None
    where = out / f"prompt-{result.index + 1}"
    why = ("splits" if step == result.split_step else "goes over the KL limit"
           if step == result.kl_step else "decodes unlike its own prefill")
    announce(f"lockstep: prompt {result.index + 1} {why} at step {step}: recording both "
             f"engines up to it into {where}")
    try:
        comparison = diff(ref_spec, cand_spec, where, tokens=list(result.prompt_ids),
                          decode=step, ref_options=ref_options, cand_options=cand_options,
                          mapping=mapping)
    except LockstepError as exc:  # the token-level result stands; say why there is no more
        return replace(result, localization=Localization(step, str(where), None, str(exc)))
    return replace(result, localization=Localization(step, str(where), comparison))


def check_generation(reference: str, candidate: str, prompts: Sequence[Prompt | str], *,
                     max_new_tokens: int = 16, top_k: int = 5, near_tie: float = NEAR_TIE,
                     max_kl: float = MAX_KL, localize: bool = True,
                     out: str | Path = "lockstep-generate",
                     ref_options: dict[str, Any] | None = None,
                     cand_options: dict[str, Any] | None = None,
                     progress: Callable[[int, int], Any] | None = None,
                     announce: Callable[[str], Any] = lambda m: None,
                     mapping: Any = None,
                     batch: dict[str, Any] | None = None) -> GenerationResult:
    """Greedy-decode ``max_new_tokens`` tokens of each prompt on both engines and compare.

    ``reference`` and ``candidate`` are engine specs (``hf:DIR``, ``llamacpp:FILE.gguf``, ...);
    ``ref_options``/``cand_options`` go to their constructors (e.g. ``{"dtype": "float64"}`` for
    an engine that takes a dtype; ``lockstep.engines.registry.KINDS`` says which do).
    A prompt is text (tokenized by the reference, no special tokens added) or a ``Prompt``
    (chat messages, token ids). ``near_tie`` is the threshold in nats under which a split is
    a near-tie; a prompt whose mean KL(reference || candidate) is above ``max_kl`` nats
    diverges even where the top tokens agree. With ``localize``, each prompt's first real
    split (or first step over ``max_kl``) is recorded under ``out`` and its tensors compared.
    ``progress(done, total)`` is called after each prompt. ``mapping`` (a MappingFile) pairs
    the tensors compared where a prompt diverges. ``batch`` (``{"padding": "left",
    "join_at": None}``) runs the candidate on all the prompts as one batch (the reference
    runs each alone; docs/batching.md).
    """
    if max_new_tokens < 1:
        raise UsageError(f"--max-new-tokens must be at least 1, got {max_new_tokens}")
    if top_k < 1:
        raise UsageError(f"--top-k must be at least 1, got {top_k}")
    if not near_tie >= 0:
        raise UsageError(f"--near-tie must be 0 or more (nats), got {near_tie}")
    if not max_kl >= 0:
        raise UsageError(f"--max-kl must be 0 or more (nats), got {max_kl}")
    settings = Settings(max_new_tokens, top_k=top_k, near_tie=near_tie, max_kl=max_kl)
    items = as_prompts(prompts)
    ref_options, cand_options = dict(ref_options or {}), dict(cand_options or {})
    start = time.perf_counter()
    clock = Clock()
    ref = open_engine(reference, **ref_options)
    cand = open_engine(candidate, **cand_options)
    if batch is not None and not cand.can_batch():
        raise cand.no_batch()
    results: list[PromptResult] = []
    try:
        announce(f"lockstep: loading {reference}")
        ref.load()
        announce(f"lockstep: loading {candidate}")
        cand.load()
        load_s = time.perf_counter() - start
        ids = [_prompt_ids(ref, p, i) for i, p in enumerate(items)]
        sides = Side(reference, ref.meta()), Side(candidate, cand.meta())
        if batch is not None:
            batch_ahead(clock, ref, cand, ids, settings.max_new_tokens, batch)
        for i, (prompt, prompt_ids) in enumerate(zip(items, ids)):
            results.append(run_prompt(i, prompt, prompt_ids, ref, cand, clock, settings))
            if progress is not None:
                progress(i + 1, len(items))
    finally:
        cand.close()
        ref.close()
    t0 = time.perf_counter()
    if localize and batch is not None:
        results = _localize_batch(results, reference, candidate, Path(out), ref_options,
                                  cand_options, batch, announce, mapping)
    elif localize:
        results = [_localize(r, reference, candidate, Path(out), ref_options, cand_options,
                             announce, mapping) if r.diverged_step is not None else r
                   for r in results]
    localize_s = time.perf_counter() - t0
    timing = Timing(load_s=load_s, reference_s=clock.seconds.get(id(ref), 0.0),
                    candidate_s=clock.seconds.get(id(cand), 0.0), localize_s=localize_s,
                    total_s=time.perf_counter() - start)
    return GenerationResult(reference=sides[0], candidate=sides[1], settings=settings,
                            prompts=tuple(results), timing=timing)
