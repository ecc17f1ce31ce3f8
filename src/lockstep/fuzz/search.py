"""The search: generate inputs, check each with the teacher-forced generation check, shrink
the failures, localize the minimal ones with the tensor comparison."""

from __future__ import annotations

import time
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable

from ..engines import Engine, open_engine
from ..errors import LockstepError, UsageError
from ..generation.check import Clock, run_prompt
from ..generation.decode_check import (
    FULL_PRECISION_PREFILL_KL,
    MEASURED_FLOOR,
    NOISE_FACTOR,
    REDUCED_FLOOR,
)
from ..generation.metrics import MAX_KL, NEAR_TIE
from ..generation.prompts import Prompt
from ..generation.result import PromptResult, Settings
from .batch import Skip, check_batch, localize_batch, shrink_batch
from .inputs import BatchInput, FuzzInput, generate, space_of
from .result import Failure, Finding, FuzzResult
from .shrink import shrink

__all__ = ["fuzz", "DEFAULT_BUDGET", "SHRINK_BUDGET", "SHRINK_PER_ORIGIN"]

#: inputs tried by default: every boundary case of a 512-position model, and random ones
DEFAULT_BUDGET = 64
#: checks one failing input's shrinking may take
SHRINK_BUDGET = 80
#: failing inputs shrunk per kind of failure (divergence, each crash type), smallest first
SHRINK_PER_ORIGIN = 2


def kl_limit(baseline_kl: float, max_kl: float) -> float:
    """The KL (nats) a step may show before it fails: the baseline's drift times
    ``NOISE_FACTOR``, at least a floor for the precision the baseline shows (an engine at
    full precision agrees to about 1e-12), and never above ``max_kl``."""
    floor = MEASURED_FLOOR if baseline_kl <= FULL_PRECISION_PREFILL_KL else REDUCED_FLOOR
    return min(max_kl, max(floor, NOISE_FACTOR * baseline_kl))


class _Checker:
    """Runs the generation check on one input; reopens a candidate that crashed."""

    def __init__(self, ref: Engine, cand_spec: str, cand_options: dict[str, Any],
                 settings: Settings) -> None:
        self.ref, self.cand_spec, self.cand_options = ref, cand_spec, cand_options
        self.settings = settings
        self.clock = Clock()
        self.cand = self._open()
        self.limit = settings.max_kl
        self.count = 0

    def _open(self) -> Engine:
        cand = open_engine(self.cand_spec, **self.cand_options)
        cand.load()
        return cand

    def _reopen(self) -> None:
        try:
            self.cand.close()
        except Exception:
            pass
        self.cand = self._open()

    def close(self) -> None:
        self.cand.close()

    def run(self, x: FuzzInput | BatchInput
            ) -> PromptResult | list[PromptResult] | Failure | Skip | str:
        """The check's result (a batch: each sequence's), a crash (``Failure``), why both
        engines refused the input, or why the candidate could not run a batch (``Skip``)."""
        self.count += 1
        if isinstance(x, BatchInput):
            try:
                return check_batch(x, self.ref, self.cand, self.settings)
            except Exception as exc:
                self._reopen()
                return Failure("crash", error=f"{type(exc).__name__}: {exc}")
        prompt = Prompt(tokens=x.tokens)
        try:
            return run_prompt(0, prompt, list(x.tokens), self.ref, self.cand, self.clock,
                              self.settings)
        except Exception as exc:
            first = exc
        try:  # did the reference refuse it, or fail on it?
            self.ref.decode_logits(list(x.tokens), x.steps)
            ref_error: Exception | None = None
        except Exception as exc:
            ref_error = exc
        try:
            self.cand.decode_logits(list(x.tokens), x.steps)
            cand_error: Exception | None = None if ref_error is not None else first
        except Exception as exc:
            cand_error = exc
        if cand_error is not None and not isinstance(cand_error, UsageError):
            self._reopen()
            return Failure("crash", error=f"{type(cand_error).__name__}: {cand_error}")
        return f"{type(ref_error or first).__name__}: {ref_error or first}"

    def failure(self, x: FuzzInput | BatchInput) -> Failure | Skip | str | None:
        """How ``x`` fails (None: it passes; a string: both engines refused it)."""
        return self.judge(self.run(x))

    def judge(self, result: PromptResult | list[PromptResult] | Failure | Skip | str
              ) -> Failure | Skip | str | None:
        """How a check's result fails, if it does (a batch: its sequence failing at the
        earliest step)."""
        if isinstance(result, (Failure, Skip, str)):
            return result
        if isinstance(result, list):
            failed = [(f, i) for i, r in enumerate(result)
                      if isinstance(f := self.judge(r), Failure)]
            if not failed:
                return None
            first, i = min(failed, key=lambda f: (f[0].step or 0, f[1]))
            return replace(first, sequence=i)
        over = next((s for s in result.steps if s.kl > self.limit), None)
        found = [(s, w) for s, w in (
            (result.split_step, "real split"), (result.kl_step, "mean KL over the limit"),
            (1 if result.decode_check is not None and result.decode_check.broken else None,
             "decode unlike its own prefill"),
            (over.step if over is not None else None, "KL over the limit")) if s is not None]
        if not found:
            return None
        step, why = min(found, key=lambda f: f[0])
        kl = result.steps[step].kl if step < len(result.steps) else None
        if why == "decode unlike its own prefill" and result.decode_check is not None:
            kl = result.decode_check.kl
        return Failure("diverged", step=step, kl=kl, why=why)


def _localize(finding: Finding, reference: str, candidate: str, out: Path,
              ref_options: dict[str, Any], cand_options: dict[str, Any],
              index: int) -> Finding:
    from ..workflows.diff import diff

    step = finding.failure.step
    if finding.failure.kind != "diverged" or step is None:
        return finding
    where = out / f"finding-{index}"
    if isinstance(finding.input, BatchInput):
        return localize_batch(finding, reference, candidate, where, ref_options, cand_options)
    try:
        comparison = diff(reference, candidate, where, tokens=list(finding.input.tokens),
                          decode=step, ref_options=ref_options, cand_options=cand_options)
    except LockstepError as exc:
        return replace(finding, out=str(where), localize_error=str(exc))
    amplified = getattr(comparison.replay, "amplified", None)
    return finding.located(str(where), comparison.verdict, comparison.first_divergence,
                           comparison.diagnosis, precision=amplified.why
                           if amplified is not None and amplified.explained else None)


def fuzz(reference: str, candidate: str, *, budget: int = DEFAULT_BUDGET, seed: int = 0,
         max_length: int | None = None, shrink_budget: int = SHRINK_BUDGET,
         near_tie: float = NEAR_TIE, max_kl: float = MAX_KL, localize: bool = True,
         out: str | Path = "lockstep-fuzz", ref_options: dict[str, Any] | None = None,
         cand_options: dict[str, Any] | None = None,
         progress: Callable[[int, int], Any] | None = None,
         announce: Callable[[str], Any] = lambda m: None) -> FuzzResult:
    """Try ``budget`` inputs on both engines (the same inputs for the same ``seed``), shrink
    each kind of failure to its smallest input and localize those; see ``lockstep.fuzz``.

    A step fails when its tokens split for real (not a near-tie), when the prompt's mean KL
    is over ``max_kl``, when decode parts from the candidate's own prefill, or when its KL is
    over ``kl_limit`` of the first (baseline) input's: drift as large as the engines show on
    an ordinary prompt is not a failure. An engine that raises on an input (other than
    refusing it with a usage error) is a crash finding."""
    if budget < 2:
        raise UsageError(f"--budget must be at least 2 (the baseline and one more), got {budget}")
    if max_length is not None and max_length < 1:
        raise UsageError(f"--max-length must be at least 1, got {max_length}")
    start = time.perf_counter()
    ref_options, cand_options = dict(ref_options or {}), dict(cand_options or {})
    settings = Settings(2, near_tie=near_tie, max_kl=max_kl)
    ref = open_engine(reference, **ref_options)
    announce(f"lockstep: loading {reference}")
    ref.load()
    failing: list[tuple[FuzzInput | BatchInput, Failure]] = []
    rejected: list[tuple[FuzzInput, str]] = []
    skipped: list[tuple[BatchInput, str]] = []
    findings: list[Finding] = []
    try:
        announce(f"lockstep: loading {candidate}")
        checker = _Checker(ref, candidate, cand_options, settings)
    except BaseException:
        ref.close()
        raise
    try:
        _, row = ref.decode_logits(list(range(1, 3)), 1)
        space = space_of(ref, checker.cand, int(row.shape[-1]), max_length)
        inputs = generate(space, budget, seed)
        for i, x in enumerate(inputs):
            checker.settings = Settings(x.steps, near_tie=near_tie, max_kl=max_kl)
            result = checker.run(x)
            if i == 0 and isinstance(result, PromptResult):  # the baseline: the drift
                checker.limit = kl_limit(max(s.kl for s in result.steps), max_kl)
            outcome = checker.judge(result)
            if isinstance(outcome, Skip) and isinstance(x, BatchInput):
                skipped.append((x, outcome.reason))
            elif isinstance(outcome, str) and isinstance(x, FuzzInput):
                rejected.append((x, outcome))
            elif isinstance(outcome, Failure):
                failing.append((x, outcome))
            if progress is not None:
                progress(i + 1, len(inputs))
        shrunk: dict[tuple[str, bool], int] = {}  # per origin, single and batch inputs apart
        for x, failure in sorted(failing, key=lambda f: f[0].key):
            origin = failure.origin
            kind = (origin, isinstance(x, BatchInput))
            if shrunk.get(kind, 0) >= SHRINK_PER_ORIGIN:
                continue
            shrunk[kind] = shrunk.get(kind, 0) + 1
            announce(f"lockstep: shrinking {x.describe()} ({failure.why or failure.error})")

            def still_fails(y: FuzzInput | BatchInput, origin: str = origin) -> bool:
                checker.settings = Settings(y.steps, near_tie=near_tie, max_kl=max_kl)
                got = checker.failure(y)
                return isinstance(got, Failure) and got.origin == origin

            small: FuzzInput | BatchInput
            if isinstance(x, BatchInput):
                small, checks = shrink_batch(x, still_fails, budget=shrink_budget)
            else:
                small, checks = shrink(x, still_fails, budget=shrink_budget)
            checker.settings = Settings(small.steps, near_tie=near_tie, max_kl=max_kl)
            final = checker.failure(small)
            if not isinstance(final, Failure):  # flaky: keep the input as it was found
                small, final = x, failure
            finding = Finding(small, final, x, checks)
            # one finding per origin, size (and batch layout): the smaller of two alike
            twin = next((f for f in findings if f.failure.origin == final.origin
                         and type(f.input) is type(small)
                         and getattr(f.input, "layout", "") == getattr(small, "layout", "")
                         and f.input.key[:3] == small.key[:3]), None)
            if twin is None:
                findings.append(finding)
            else:
                kept = finding if small.key < twin.input.key else twin
                findings[findings.index(twin)] = replace(kept, shrunk_from=twin.shrunk_from + 1)
    finally:
        checker.close()
        ref.close()
    if localize:
        findings = [_localize(f, reference, candidate, Path(out), ref_options, cand_options,
                              i + 1) for i, f in enumerate(findings)]
    return FuzzResult(reference, candidate, seed, budget, space, checker.limit,
                      tried=len(inputs), failing=len(failing), rejected=tuple(rejected),
                      findings=tuple(findings), checks=checker.count,
                      seconds=time.perf_counter() - start, skipped=tuple(skipped))
