"""``lockstep diff``: record a reference engine and a candidate engine on the same tokens,
then compare them.

The candidate sees exactly the reference's prompt token ids and, by default, is teacher-forced
with the reference's greedy tokens, so one near-tie cannot make every later step
incomparable. ``dump:DIR`` uses an existing recording instead of running an engine
(``engines.registry.recording``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..compare import Comparison, Tolerances, compare
from ..engines import open_engine
from ..engines.registry import construct, recording
from ..engines.rerun import fed_tokens, options_from_meta
from ..errors import UsageError
from ..store.reader import open_dump
from .capture import capture

if TYPE_CHECKING:
    from ..align.mapping import MappingFile

__all__ = ["diff"]


def diff(ref_spec: str, cand_spec: str, out: str | Path, *, prompt: str | None = None,
         tokens: Sequence[int] | None = None, decode: int = 0, free_running: bool = False,
         ref_options: dict[str, Any] | None = None, cand_options: dict[str, Any] | None = None,
         tolerances: Tolerances | None = None, mapping: MappingFile | None = None,
         overwrite: bool = True, replay: bool = True,
         announce: Callable[[str], Any] = lambda m: None,
         selection: dict[str, Any] | None = None) -> Comparison:
    """Record both engines into ``out``/reference.lsd and ``out``/candidate.lsd; compare.
    With ``replay``, a reference engine with a module tree re-runs its ops around the
    divergence on the candidate's inputs (``lockstep.replay``). ``selection``: ``capture``'s
    ``include``/``exclude``/``layers``, for both engines."""
    out = Path(out)
    for spec, options in ((ref_spec, ref_options), (cand_spec, cand_options)):
        if recording(spec) is None:  # a bad spec or option of either engine: said before the
            construct(spec, **(options or {}))  # reference's recording, not after it
    ref_dump = recording(ref_spec)
    if ref_dump is None:
        ref_dump = out / "reference.lsd"
        capture(ref_spec, str(ref_dump), prompt=prompt, tokens=tokens, decode=decode,
                overwrite=overwrite, announce=announce, **(selection or {}),
                **(ref_options or {}))
    with open_dump(ref_dump) as ref:
        ids = ref.meta.get("prompt_token_ids")
        decode = int(ref.meta.get("decode", max(ref.steps, default=0)))
        forced = ref.meta.get("generated_token_ids") or fed_tokens(ref)
    cand_dump = recording(cand_spec)
    if cand_dump is None:
        if not ids:
            raise UsageError(f"{ref_dump} has no prompt_token_ids in its metadata, so the "
                             "candidate cannot be fed the same tokens")
        cand_dump = out / "candidate.lsd"
        capture(cand_spec, str(cand_dump), tokens=ids, decode=decode,
                forced=None if free_running else forced, overwrite=overwrite,
                announce=announce, **(selection or {}), **(cand_options or {}))
    result = compare(ref_dump, cand_dump, tolerances, mapping=mapping)
    if replay and recording(ref_spec) is None:
        result = replay_diff(ref_spec, result, ref_options or {}, tolerances=tolerances,
                             mapping=mapping, announce=announce,
                             cand_spec=None if recording(cand_spec) else cand_spec,
                             cand_options=cand_options)
    return result


def replay_diff(ref_spec: str, result: Comparison, ref_options: dict[str, Any], *,
                tolerances: Tolerances | None = None, mapping: MappingFile | None = None,
                at: str | None = None, cand_spec: str | None = None,
                cand_options: dict[str, Any] | None = None,
                announce: Callable[[str], Any] = lambda m: None) -> Comparison:
    """The dual test around ``result``'s divergence (or the first pair over tolerance, or the
    pair whose reference record is ``at``), run with the reference engine ``ref_spec``
    loaded again; when the first op's error is explained by a lower precision, the dumps are
    compared again with the candidate taken to compute in it. With ``cand_spec`` (an engine
    with a module tree: zoo:, py:, hf:), the candidate's ops also run on the reference's
    inputs (the other way). Returns the comparison with its ``replay``."""
    from dataclasses import replace

    from ..replay import replay_comparison
    from ..replay.audit import applies, audit_amplification

    targets = [p for p in result.results if p.ref_name == at] if at else None
    if at and not targets:
        raise UsageError(f"--at {at!r}: no compared pair has that reference name")
    if result.verdict == "match" and not at:
        return result
    engine = open_engine(ref_spec, isolate=False, **ref_options)
    if engine.native:  # no module tree to replay: never loaded
        return result
    with open_dump(result.reference.path) as ref:
        ids = ref.meta.get("prompt_token_ids")
        forced = ref.meta.get("generated_token_ids") or fed_tokens(ref)
    if not ids:
        return result
    candidate = None
    if cand_spec is not None:
        with open_dump(result.candidate.path) as cand:
            cand_forced = cand.meta.get("generated_token_ids") or fed_tokens(cand)
            options = options_from_meta(cand_spec, dict(cand.meta), cand_options)
        candidate = open_engine(cand_spec, isolate=False, **options)
        if candidate.native:  # no module tree: never loaded
            candidate = None
    announce(f"lockstep: replaying the reference's ops around the divergence ({ref_spec})")
    with engine:
        if engine.torch_module() is None:
            return result
        if candidate is None:
            replayed = replay_comparison(engine, result, ids, forced,
                                         at=targets[0] if targets else None)
        else:
            announce(f"lockstep: and the candidate's ops on the reference's inputs "
                     f"({cand_spec})")
            with candidate:
                replayed = replay_comparison(engine, result, ids, forced,
                                             at=targets[0] if targets else None,
                                             candidate=candidate, cand_forced=cand_forced)
        if replayed.precision is not None and result.verdict == "diverged":
            result = compare(result.reference.path, result.candidate.path, tolerances,
                             mapping=mapping, cand_precision=replayed.precision)
        if applies(result):  # no jump: is it the candidate's precision, amplified?
            announce("lockstep: replaying every op of the step, to tell amplified precision "
                     "from a bug")
            replayed = replace(replayed, amplified=audit_amplification(engine, result, ids, forced))
    if replayed.amplified is not None and replayed.amplified.explained:
        complete = result.coverage is None or result.coverage.complete
        result = replace(result, verdict="drift" if complete else "incomplete",
                         first_divergence=None, diagnosis=None)
    return replace(result, replay=replayed)
