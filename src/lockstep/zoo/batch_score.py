"""The zoo's batch bugs scored: each run under ``diff --batch`` (transformers on each prompt
alone, the zoo engine on all of them as one batch), where lockstep localized it, and which
sequences its diagnosis named. Bug-free controls: left and right padding, and a request
joining mid-decode with each, must not diverge."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable

from ..workflows.batch import batch_diff
from .batch_bugs import BATCH_BUGS, BATCH_PROMPTS, JOIN_PROMPT, BatchBug
from .score import FORCED, ControlResult, ZooResult, ZooScore, tiny_model

__all__ = ["BatchZooResult", "run_batch_zoo", "BATCH_FAMILY", "CONTROL_RUNS"]

BATCH_FAMILY = "llama"  #: the batch bugs are in code every family shares: one family runs
#: the bug-free batched runs: (padding, the batch step the third prompt joins at)
CONTROL_RUNS = (("left", None), ("right", None), ("left", 2), ("right", 2))


@dataclass(frozen=True)
class BatchZooResult(ZooResult):
    """One batch bug: what lockstep said, for which sequence, naming which pair."""

    sequence: int | None = None  #: the first sequence whose comparison diverged
    named: tuple[int, ...] = ()  #: the sequences the diagnosis names

    @property
    def localized(self) -> bool:
        bug = self.bug
        return super().localized and isinstance(bug, BatchBug) and \
            self.sequence == bug.sequence

    @property
    def classified(self) -> bool:
        bug = self.bug
        return super().classified and isinstance(bug, BatchBug) and \
            tuple(self.named) == bug.pair


def _run(model: Path, out: Path, padding: str, join_at: int | None,
         bug: str | None = None) -> Any:
    prompts = [*BATCH_PROMPTS, *([JOIN_PROMPT] if join_at else [])]
    return batch_diff(f"hf:{model}", f"zoo:{model}", out, tokens=prompts, decode=len(FORCED),
                      padding=padding, join_at=join_at,
                      cand_options={"bug": bug} if bug else {})


def run_batch_zoo(root: str | Path, *, bugs: Iterable[str] | None = None,
                  controls: bool = True,
                  progress: Callable[[str], Any] = lambda m: None) -> ZooScore:
    """Run every batch bug (or those named), and the bug-free batched controls."""
    import torch

    root = Path(root) / "batch"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    t_all = time.perf_counter()
    results: list[ZooResult] = []
    checks: list[ControlResult] = []
    try:
        model = tiny_model(BATCH_FAMILY, Path(root).parent / "models" / BATCH_FAMILY)
        for name in list(bugs) if bugs is not None else list(BATCH_BUGS):
            bug = BATCH_BUGS[name]
            progress(f"batch: {name}")
            t0 = time.perf_counter()
            found = _run(model, root / name, bug.padding, bug.join_at, name)
            first = found.diverged[0] if found.diverged else None
            comparison = found.sequences[first] if first is not None else None
            div = comparison.first_divergence if comparison is not None else None
            diag = comparison.diagnosis if comparison is not None else None
            named = tuple(diag.detail.get("sequences", ())) if diag is not None else ()
            results.append(BatchZooResult(
                bug, BATCH_FAMILY, found.verdict, div.step if div else None,
                (div.canonical or div.ref_name) if div else None,
                diag.kind if diag else None,
                f"sequence {first}: {diag.title}" if diag else None,
                seconds=time.perf_counter() - t0, sequence=first, named=named))
        for padding, join in CONTROL_RUNS if controls else ():
            label = f"batch, {padding} padding" + (f", joining at step {join}" if join else "")
            progress(label)
            found = _run(model, root / f"control-{padding}-{join}", padding, join)
            checks.append(ControlResult(BATCH_FAMILY, label, found.verdict))
    finally:
        torch.set_num_threads(threads)
    return ZooScore(tuple(results), tuple(checks), time.perf_counter() - t_all)
