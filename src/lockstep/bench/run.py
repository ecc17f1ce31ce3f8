"""Measuring two engines side by side.

Each engine runs in a process of its own (so each one's peak memory is its own, and neither
one's allocations slow the other), and every timing is taken inside that process, around the
engine's own steps (the pipe's cost is never in a figure). The two are interleaved, one
iteration each in turn, so a machine that slows down for a while slows both alike; the
ratio's interval is what to read on a shared machine.

Per iteration and engine: one prefill at each prompt length (time to first token), then one
prefill of the base prompt followed by ``max_new_tokens`` greedy decode steps (the mean
decode step is one sample of ms/token).

The iterations (and the warm-up rounds, at least one each) are split over ``forks`` pairs of
fresh processes, one after the other, each loaded and warmed up anew (JMH's forks): a new
process of the same engine runs a few percent
faster or slower than the last, which no number of iterations in one process shows, so
each figure's interval is resampled over the forks too (``bench.stats``).
"""

from __future__ import annotations

from dataclasses import dataclass
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
              warmup: int = 10, iters: int = 100, modules: bool = False, forks: int = 5,
              ref_options: dict[str, Any] | None = None,
              cand_options: dict[str, Any] | None = None,
              progress: Callable[[int, int, str], Any] = lambda done, total, what: None,
              ) -> BenchResult:
    """Measure both engines; see the module docstring."""
    if forks < 1:
        raise UsageError(f"--forks must be at least 1, not {forks}")
    if iters < 2 * forks:
        raise UsageError(f"--iters must be at least 2 per fork (an interval needs samples): "
                         f"{2 * forks} for {forks} fork(s), not {iters}")
    if warmup < 0 or max_new_tokens < 1:
        raise UsageError("--warmup must be 0 or more and --max-new-tokens at least 1")
    result = BenchResult(reference, candidate, settings={
        "lengths": list(lengths), "max_new_tokens": max_new_tokens, "warmup": warmup,
        "iters": iters, "forks": forks})
    plan: _Plan | None = None
    samples: dict[str, dict[str, list[float]]] = {"reference": {}, "candidate": {}}
    fork_of: list[int] = []  # each kept round's fork
    per_fork = _split(iters, forks)
    warm = [max(n, 1) if warmup else 0 for n in _split(warmup, forks)]  # a fresh process
    total = sum(warm) + iters                                             # warms up anew
    done = 0
    for fork in range(forks):
        sides = {"reference": open_isolated(reference, **(ref_options or {})),
                 "candidate": open_isolated(candidate, **(cand_options or {}))}
        where = f"fork {fork + 1} of {forks}: " if forks > 1 else ""
        try:
            for name, engine in sides.items():
                progress(done, total, f"{where}loading {engine.spec}")
                engine.load()
                result.meta.setdefault(name, engine.meta())
            if plan is None:
                plan = _plan(sides, base_ids, prompts, lengths, max_new_tokens, result)
            for i in range(warm[fork] + per_fork[fork]):
                keep = i >= warm[fork]
                progress(done, total, where + ("measuring" if keep else "warming up"))
                _round(sides, plan, samples if keep else None)
                fork_of += [fork] if keep else []
                done += 1
            if modules and fork == forks - 1:
                for side, engine in sides.items():
                    progress(done, total, f"timing the modules of {engine.spec}")
                    result.modules[side] = engine.module_times(
                        plan.base, 1 + max_new_tokens, iters=max(3, min(iters, 20)),
                        warmup=min(warmup, 3))
            for side, engine in sides.items():
                _peak(result.memory, side, engine.peak_memory())
        finally:
            for engine in sides.values():
                engine.close()
    progress(total, total, "measured")
    assert plan is not None
    _figures(result, plan, samples, fork_of if forks > 1 else None)
    return result


def _split(n: int, forks: int) -> list[int]:
    """``n`` rounds over ``forks`` forks, as evenly as they go, the first ones taking more."""
    return [n // forks + (1 if f < n % forks else 0) for f in range(forks)]


@dataclass(frozen=True)
class _Plan:
    """What every fork runs: the base prompt, the prompts of each length, whether decode is
    measured (and why not)."""

    base: list[int]
    by_length: dict[int, list[int]]
    decode_why: str | None
    max_new_tokens: int


def _plan(sides: dict[str, IsolatedEngine], base_ids: Sequence[int] | None,
          prompts: Sequence[Any], lengths: Sequence[int], max_new_tokens: int,
          result: BenchResult) -> _Plan:
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
    return _Plan(base, by_length, decode_why, max_new_tokens)


def _round(sides: dict[str, IsolatedEngine], plan: _Plan,
           samples: dict[str, dict[str, list[float]]] | None) -> None:
    """One iteration on each engine in turn; its times added to ``samples`` (None: warm-up)."""
    for side, engine in sides.items():
        for n, ids in plan.by_length.items():
            t = engine.step_times(ids, 1)[0]
            if samples is not None:
                samples[side].setdefault(f"ttft:{n}", []).append(t)
        if not plan.decode_why:
            times = engine.step_times(plan.base, 1 + plan.max_new_tokens)
            if samples is not None:
                samples[side].setdefault("decode", []).append(
                    sum(times[1:]) / plan.max_new_tokens)


def _peak(memory: dict[str, dict[str, Any]], side: str, got: dict[str, Any]) -> None:
    """The largest of each peak over the forks' processes."""
    have = memory.setdefault(side, {})
    for key, value in got.items():
        old = have.get(key)
        have[key] = value if old is None or (value is not None and value > old) else old


def _figures(result: BenchResult, plan: _Plan, samples: dict[str, dict[str, list[float]]],
             forks: list[int] | None) -> None:
    ref, cand = samples["reference"], samples["candidate"]
    for n in plan.by_length:
        key = f"ttft:{n}"
        result.figures.append(Figure.of(
            f"time to first token, {n} tokens", "ms",
            [t * 1e3 for t in ref[key]], [t * 1e3 for t in cand[key]], forks=forks))
        result.figures.append(Figure.of(
            f"prompt tokens/s, {n} tokens", "tokens/s",
            [n / t for t in ref[key]], [n / t for t in cand[key]], lower_is_better=False,
            forks=forks))
    if not plan.decode_why:
        result.figures.append(Figure.of(
            "decode ms/token", "ms", [t * 1e3 for t in ref["decode"]],
            [t * 1e3 for t in cand["decode"]], forks=forks))
        result.figures.append(Figure.of(
            "decode tokens/s", "tokens/s", [1 / t for t in ref["decode"]],
            [1 / t for t in cand["decode"]], lower_is_better=False, forks=forks))
