"""Measuring two engines side by side.

Each engine runs in a process of its own (so each one's peak memory is its own, and neither
one's allocations slow the other), and every timing is taken inside that process, around the
engine's own steps (the pipe's cost is never in a figure). The two are interleaved, one
iteration each in turn, so a machine that slows down for a while slows both alike; the
ratio's interval is what to read on a shared machine.

Per iteration and engine: one prefill at each prompt length (time to first token), then one
prefill of the base prompt followed by ``max_new_tokens`` greedy decode steps (the mean
decode step is one sample of ms/token).
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

from ..engines.isolated import IsolatedEngine, open_isolated
from ..errors import UsageError
from .result import BenchResult, Figure

__all__ = ["run_bench", "prompt_of_length", "DEFAULT_LENGTHS"]

DEFAULT_LENGTHS = (32, 128, 512)


def prompt_of_length(base: Sequence[int], n: int) -> list[int]:
    """``n`` token ids: ``base`` repeated (a real prompt's tokens, not one id n times)."""
    if not base:
        raise UsageError("the prompt has no tokens")
    reps = -(-n // len(base))
    return (list(base) * reps)[:n]


def _tokens_of(engine: IsolatedEngine, prompts: Sequence[Any]) -> list[int]:
    """The prompts' token ids (``generation.prompts.Prompt``s), one after another, as the
    reference tokenizes them (chat templates applied where a prompt asks)."""
    ids: list[int] = []
    for prompt in prompts:
        if prompt.tokens is not None:
            ids += [int(t) for t in prompt.tokens]
        else:
            messages = prompt.chat_messages()
            ids += engine.chat_tokens(messages) if messages is not None \
                else engine.tokenize(prompt.text or "")
    if not ids:
        raise UsageError("the prompts have no tokens")
    return ids


def _too_long(limits: dict[str, int | None], specs: dict[str, str], n: int) -> str | None:
    """Why ``n`` positions do not fit one of the engines, or None."""
    for side, limit in limits.items():
        if limit is not None and n > limit:
            return f"{specs[side]} takes {limit} positions"
    return None


def run_bench(reference: str, candidate: str, base_ids: Sequence[int] | None = None, *,
              prompts: Sequence[Any] = (),
              lengths: Sequence[int] = DEFAULT_LENGTHS, max_new_tokens: int = 32,
              warmup: int = 10, iters: int = 100, modules: bool = False,
              ref_options: dict[str, Any] | None = None,
              cand_options: dict[str, Any] | None = None,
              progress: Callable[[int, int, str], Any] = lambda done, total, what: None,
              ) -> BenchResult:
    """Measure both engines; see the module docstring."""
    if iters < 2:
        raise UsageError(f"--iters must be at least 2 (an interval needs samples), not {iters}")
    if warmup < 0 or max_new_tokens < 1:
        raise UsageError("--warmup must be 0 or more and --max-new-tokens at least 1")
    result = BenchResult(reference, candidate, settings={
        "lengths": list(lengths), "max_new_tokens": max_new_tokens, "warmup": warmup,
        "iters": iters})
    sides = {"reference": open_isolated(reference, **(ref_options or {})),
             "candidate": open_isolated(candidate, **(cand_options or {}))}
    try:
        for name, engine in sides.items():
            progress(0, 0, f"loading {engine.spec}")
            engine.load()
            result.meta[name] = engine.meta()
        base = [int(i) for i in base_ids] if base_ids is not None else \
            _tokens_of(sides["reference"], prompts)
        result.settings["prompt_tokens"] = len(base)
        limits = {side: engine.max_positions() for side, engine in sides.items()}
        specs = {side: engine.spec for side, engine in sides.items()}
        by_length: dict[int, list[int]] = {}
        for n in lengths:
            why = _too_long(limits, specs, n)
            if why:
                result.skipped[f"TTFT at {n} tokens"] = why
            else:
                by_length[n] = prompt_of_length(base, n)
        decode_why = _too_long(limits, specs, len(base) + max_new_tokens)
        if decode_why:
            result.skipped["decode"] = decode_why
        samples: dict[str, dict[str, list[float]]] = {s: {} for s in sides}

        def one_round(keep: bool) -> None:
            for side, engine in sides.items():
                got = samples[side]
                for n, ids in by_length.items():
                    t = engine.step_times(ids, 1)[0]
                    if keep:
                        got.setdefault(f"ttft:{n}", []).append(t)
                if not decode_why:
                    times = engine.step_times(base, 1 + max_new_tokens)
                    if keep:
                        got.setdefault("decode", []).append(sum(times[1:]) / max_new_tokens)

        total = warmup + iters
        for i in range(total):
            progress(i, total, "warming up" if i < warmup else "measuring")
            one_round(keep=i >= warmup)
        progress(total, total, "measured")
        ref, cand = samples["reference"], samples["candidate"]
        for n in by_length:
            key = f"ttft:{n}"
            result.figures.append(Figure.of(
                f"time to first token, {n} tokens", "ms",
                [t * 1e3 for t in ref[key]], [t * 1e3 for t in cand[key]]))
            result.figures.append(Figure.of(
                f"prompt tokens/s, {n} tokens", "tokens/s",
                [n / t for t in ref[key]], [n / t for t in cand[key]], lower_is_better=False))
        if not decode_why:
            result.figures.append(Figure.of(
                "decode ms/token", "ms", [t * 1e3 for t in ref["decode"]],
                [t * 1e3 for t in cand["decode"]]))
            result.figures.append(Figure.of(
                "decode tokens/s", "tokens/s", [1 / t for t in ref["decode"]],
                [1 / t for t in cand["decode"]], lower_is_better=False))
        if modules:
            for side, engine in sides.items():
                progress(0, 0, f"timing the modules of {engine.spec}")
                result.modules[side] = engine.module_times(
                    base, 1 + max_new_tokens, iters=max(3, min(iters, 20)),
                    warmup=min(warmup, 3))
        for side, engine in sides.items():
            result.memory[side] = engine.peak_memory()
    finally:
        for engine in sides.values():
            engine.close()
    return result
