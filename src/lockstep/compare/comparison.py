"""Comparing two dumps: pair, measure each pair from the memory-mapped data, decide.

Only the two tensors of the pair being measured are in memory at any time: each pair is
read where it lies in the mapped dumps, measured in chunks (compare.metrics), and its pages
are unmapped again before the next.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any, Callable, Mapping

from ..align.kinds import Kind as K
from ..align.pairing import Alignment, Pair, align
from ..align.regroup import line_up
from ..align.steps import StepMatch
from ..align.transforms import apply_transform, merged_meta
from ..batching.layout import refuse_batch_against_run
from ..errors import LockstepError
from ..store.dtypes import FLOAT_KINDS
from ..store.reader import Dump, Record, trimmer
from .case import Case, is_logits, role_of
from .chunked import ChunkReport, with_chunks
from .coverage import Coverage, coverage_of
from .diagnosis.model import Diagnosis
from .diagnosis.moe import near_tie_flip
from .diagnosis.run import diagnose_safely
from .diagnosis.sampling import sampling_diagnosis
from .metrics import ShapeMismatch, TensorMetrics, tensor_metrics
from .pair_result import PairResult, decide, inherited_errors
from .precision import PrecisionCheck, declarations, hold_declared_noise
from .ranks import RankReport, open_sides, with_ranks
from .statistics import NOTE as STATS_NOTE
from .statistics import by_statistics, stats_error
from .token_check import TokenCheck
from .tokens import check_tokens
from .tolerance import Tolerance, Tolerances

if TYPE_CHECKING:
    from ..align.mapping import MappingFile

__all__ = ["Comparison", "DumpSummary", "compare", "is_logits"]

@dataclass(frozen=True)
class DumpSummary:
    """What the report says about each side."""

    path: str
    complete: bool  #: False when the writer was killed before closing the dump
    error: str | None  #: the exception the recorded program ended with
    records: int
    steps: tuple[int, ...]
    meta: Mapping[str, Any]

    @classmethod
    def of(cls, dump: Dump) -> DumpSummary:
        return cls(str(dump.path), dump.complete, dump.error, len(dump.records),
                   tuple(dump.steps), dict(dump.meta))


@dataclass(frozen=True)
class Comparison:
    """The result of comparing a candidate dump with a reference dump. Truthy unless diverged."""

    verdict: str  #: "match", "drift", "diverged" or "incomplete" (compare.coverage)
    first_divergence: PairResult | None
    results: tuple[PairResult, ...]  #: every compared pair, in step and capture order
    ref_only: tuple[Record, ...]  #: reference records with no candidate partner
    cand_only: tuple[Record, ...]
    reference: DumpSummary
    candidate: DumpSummary
    diagnosis: Diagnosis | None = None  #: what kind of problem it is (diverged only)
    coverage: Coverage | None = None  #: what was compared, and the decisive gaps
    tokens: TokenCheck | None = None  #: the chosen tokens of both runs
    replay: Any = None  #: lockstep.replay.Replay: the dual test around the divergence, if run
    step_match: StepMatch | None = None  #: which candidate step was compared as which
    ranks: RankReport | None = None  #: how multi-rank sides were merged (compare.ranks)
    chunks: ChunkReport | None = None  #: how chunked prefills were joined (compare.chunked)
    #: steps where a precision a dump declared was not taken as noise (compare.precision)
    precision: PrecisionCheck | None = None

    @property
    def by_statistics(self) -> int:
        """Measured pairs compared by their statistics alone (a side kept no data)."""
        return sum(1 for p in self.results if by_statistics(p.note) and not math.isnan(p.error))

    @property
    def evidence(self) -> str:
        """"data" (every measured pair compared element by element), "statistics" (every one
        from statistics alone: agreement is "statistics agree", never a match) or "mixed"."""
        n = self.by_statistics
        if not n:
            return "data"
        return "statistics" if n == sum(1 for p in self.results if not math.isnan(p.error)) \
            else "mixed"

    def __bool__(self) -> bool:
        """True for match and drift: the comparison could tell, and found no bug."""
        return self.verdict in ("match", "drift")

    @property
    def steps(self) -> tuple[int, ...]:
        return tuple(sorted({r.step for r in self.results}))


def _measure(ref: Dump, cand: Dump, pair: Pair,
             tol: Tolerance) -> tuple[float, TensorMetrics | None, str | None]:
    r, c = pair.ref, pair.cand
    if not (r.has_data and c.has_data):
        return stats_error(ref, cand, r, c), None, STATS_NOTE
    try:
        ref_arr = apply_transform(pair.ref_transform, ref.read(r), ref.meta)
        cand_arr = apply_transform(pair.cand_transform, cand.read(c), merged_meta(ref, cand))
    except LockstepError as exc:  # a layout learnt elsewhere that does not fit this pair
        return math.nan, None, f"the layout transform does not fit: {exc}"
    try:  # (trimmed as it goes: pages measured need not stay in this process)
        m = tensor_metrics(ref_arr, cand_arr, logits=is_logits(r, ref.meta)
                           or is_logits(c, cand.meta), trim=trimmer(ref, cand))
    except ShapeMismatch as exc:
        return math.nan, None, str(exc)
    finally:  # measured: its pages need not stay in this process
        ref.release(r)
        cand.release(c)
    exact = tol.noise == 0.0 or (r.dtype not in FLOAT_KINDS and c.dtype not in FLOAT_KINDS)
    if math.isinf(m.rel_l2):
        error = math.inf
    elif exact:
        error = m.mismatched / m.numel if m.numel else 0.0
    else:
        error = m.rel_l2
    return error, m, None


def compare(reference: Dump | str | os.PathLike[str], candidate: Dump | str | os.PathLike[str],
            tolerances: Tolerances | None = None, *,
            progress: Callable[[int, int], None] | None = None,
            mapping: MappingFile | None = None, use_tables: bool = True,
            cand_precision: str | None = None, strict: bool | None = None) -> Comparison:
    """Compare a candidate dump against a reference dump (paths or opened dumps).

    ``mapping`` (a mapping file, docs/mapping.md) renames, transforms, ignores and sets
    tolerances before the automatic pairing; ``use_tables=False`` leaves the name tables out.
    ``cand_precision``: the candidate computes in this dtype (as its ``compute_dtype``
    metadata would say): a precision measured by replay, not declared by the dump.
    ``strict``: a bug in the diagnosis raises instead of warning (None: when the
    ``LOCKSTEP_STRICT`` environment variable is set; the test suite sets it).
    """
    # a multi-rank recording (docs/format.md "Ranks") is merged rank by rank first
    ref, cand, ranked = open_sides(reference, candidate, mapping)
    try:
        tolerances = tolerances or Tolerances()
        if mapping is not None:  # the mapping file's tolerances, after the caller's own
            tolerances = tolerances.with_patterns(mapping.tolerances())
        return with_ranks(_compare(ref, cand, tolerances, progress, mapping, use_tables,
                                   cand_precision, strict), ranked, ref, cand)
    finally:
        if cand is not candidate:
            cand.close()
        if ref is not reference:
            ref.close()


def _compare(ref: Dump, cand: Dump, tolerances: Tolerances,
             progress: Callable[[int, int], None] | None, mapping: MappingFile | None,
             use_tables: bool, cand_precision: str | None = None,
             strict: bool | None = None) -> Comparison:
    refuse_batch_against_run(ref, cand)
    recorded = cand
    # e.g. a prefill fed in chunks is one step; candidate steps numbered as the reference's
    ref, cand, regrouped, step_match = line_up(ref, cand)
    return with_chunks(_compare_steps(ref, cand, recorded, step_match, tolerances, progress,
                                      mapping, use_tables, cand_precision, strict),
                       regrouped, ref, cand)


def _compare_steps(ref: Dump, cand: Dump, recorded: Dump, step_match: StepMatch,
                   tolerances: Tolerances, progress: Callable[[int, int], None] | None,
                   mapping: MappingFile | None, use_tables: bool, cand_precision: str | None,
                   strict: bool | None) -> Comparison:
    alignment: Alignment = align(ref, cand, mapping=mapping, use_tables=use_tables)
    cand_tol_meta = cand.meta if cand_precision is None else \
        {**cand.meta, "compute_dtype": cand_precision}
    # the same tolerances from what was measured alone: the stored dtypes, a replay's precision
    cand_measured_meta = {} if cand_precision is None else {"compute_dtype": cand_precision}
    undeclared: dict[tuple[int, int], Tolerance] = {}  # (step, ref seq) -> undeclared
    measured: list[PairResult] = []
    unmeasurable: list[PairResult] = []
    covered: list[tuple[Record, Record, str | None]] = []
    total = len(alignment.pairs)
    for i, pair in enumerate(alignment.pairs):
        r, c = pair.ref, pair.cand
        tol = tolerances.for_pair(r.name, r.dtype, c.dtype, ref.meta, cand_tol_meta)
        undeclared[r.step, r.seq] = tolerances.for_pair(r.name, r.dtype, c.dtype, {},
                                                         cand_measured_meta)
        error, metrics, note = _measure(ref, cand, pair, tol)
        result = PairResult(step=r.step, ref_name=r.name, cand_name=c.name, ref_seq=r.seq,
                            cand_seq=c.seq, call=r.call, how=pair.how, ref_shape=r.shape,
                            cand_shape=c.shape, ref_dtype=r.dtype, cand_dtype=c.dtype,
                            tol=tol.match, noise=tol.noise,
                            error=error, metrics=metrics, note=note,
                            canonical=pair.canonical,
                            transform=pair.cand_transform or pair.ref_transform,
                            ref_transform=pair.ref_transform,
                            cand_transform=pair.cand_transform)
        (unmeasurable if math.isnan(error) else measured).append(result)
        covered.append((r, c, (note or "incomparable") if math.isnan(error) else None))
        if progress is not None:
            progress(i + 1, total)
    measured.sort(key=lambda p: (p.step, p.ref_seq))
    inherited = inherited_errors([p.step for p in measured], [p.ref_name for p in measured],
                                 [p.error for p in measured])
    measured = [replace(p, inherited=h) for p, h in zip(measured, inherited)]
    measured, precision = hold_declared_noise(
        measured, [undeclared[p.step, p.ref_seq] for p in measured],
        {"reference": declarations(ref.meta), "candidate": declarations(cand.meta)})
    verdict, first = decide(measured)
    results = sorted(measured + unmeasurable, key=lambda p: (p.step, p.ref_seq))
    tokens = check_tokens(ref, cand)
    token_step = tokens.first_problem
    # a greedy token off the candidate's own argmax, or tokens that differ while every
    # tensor matches: the tokens diverged where the tensors did not
    by_tokens = verdict != "diverged" and token_step is not None and (
        bool(tokens.off_argmax) or verdict == "match")
    if by_tokens:
        verdict = "diverged"
        first = next((p for p in measured if p.step == token_step and role_of(p).op == K.LOGITS),
                     None)
    coverage = coverage_of(covered, alignment.ref_only, alignment.cand_only, ref.meta,
                           cand.meta)
    if verdict != "diverged" and not coverage.complete:  # a divergence found still wins
        verdict = "incomplete"
    comparison = Comparison(verdict=verdict, first_divergence=first, results=tuple(results),
                            ref_only=alignment.ref_only, cand_only=alignment.cand_only,
                            reference=DumpSummary.of(ref), candidate=DumpSummary.of(recorded),
                            coverage=coverage, tokens=tokens, step_match=step_match,
                            precision=precision)
    if verdict == "diverged" and not by_tokens and _near_tie_flip(comparison, ref, cand):
        # a routing choice flipped where the router's logits were nearly tied: precision
        comparison = replace(comparison, verdict="drift" if coverage.complete else "incomplete",
                             first_divergence=None)
        return comparison
    if by_tokens and first is None:  # no logits pair to point at: the tokens alone
        assert token_step is not None  # by_tokens
        comparison = replace(comparison, diagnosis=sampling_diagnosis(tokens, token_step))
    elif verdict == "diverged" and first is not None:  # beside it: what kind of problem
        diagnosis = diagnose_safely(_case(comparison, ref, cand), strict=strict)
        comparison = replace(comparison, diagnosis=diagnosis)
    return comparison


def _case(comparison: Comparison, ref: Dump, cand: Dump) -> Case:
    """The case the diagnosis reads: the first divergence, every pair, the tokens."""
    assert comparison.first_divergence is not None
    return Case(comparison.first_divergence, comparison.results, ref, cand,
                tokens=comparison.tokens)


def _near_tie_flip(comparison: Comparison, ref: Dump, cand: Dump) -> bool:
    """The first divergence is a MoE routing flip at near-ties (compare.diagnosis.moe)."""
    return near_tie_flip(_case(comparison, ref, cand))
