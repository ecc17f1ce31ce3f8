"""``lockstep diff --batch`` and ``capture --batch``: the candidate runs several prompts as one
batch (padded left or right, a request joining mid-decode with ``join_at``), the reference
runs each prompt alone; the batched dump is split per sequence and each sequence is compared
with its prompt's solo run (docs/batching.md)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from ..batching.infer import REQUEST_KEY
from ..batching.layout import layout_notes
from ..batching.result import BatchComparison
from ..batching.split import layout_of, split_batch
from ..compare import Tolerances, compare
from ..engines import open_engine
from ..engines.rerun import fed_tokens
from ..errors import UsageError
from ..store.reader import open_dump

__all__ = ["batch_diff", "capture_batch", "join_steps"]


def join_steps(count: int, join_at: int | None) -> list[int]:
    """The batch step each of ``count`` prompts joins at: the last at ``join_at``."""
    if count < 2:
        raise UsageError("--batch needs two or more prompts")
    if join_at is not None and join_at < 1:
        raise UsageError(f"--join-at {join_at}: a request joins at step 1 or later")
    return [0] * (count - 1) + [join_at or 0]


def _selection(selection: dict[str, Any] | None) -> dict[str, Any]:
    """The recorder's selection arguments (``input_ids`` always kept)."""
    out = dict(selection or {})
    if out.get("include") is not None:
        out["include"] = [*out["include"], "input_ids"]
    return out


def _prompt_ids(engine: Any, prompts: Sequence[str] | None,
                tokens: Sequence[Sequence[int]] | None) -> list[list[int]]:
    ids = [list(t) for t in tokens] if tokens else [engine.tokenize(p) for p in prompts or ()]
    if any(not p for p in ids):
        raise UsageError("a prompt has no tokens; give non-empty --prompt or --tokens")
    return ids


def capture_batch(spec: str, out: str | Path, *, prompts: Sequence[str] | None = None,
                  tokens: Sequence[Sequence[int]] | None = None, decode: int = 0,
                  forced: Sequence[Sequence[int] | None] | None = None,
                  padding: str = "left", join_at: int | None = None, overwrite: bool = False,
                  data: bool = True, selection: dict[str, Any] | None = None,
                  announce: Callable[[str], Any] = lambda m: None,
                  **engine_options: Any) -> list[list[int]]:
    """Record ``spec`` running the prompts as one batch into ``out``; returns each
    sequence's chosen tokens. ``selection``: ``include``/``exclude``/``layers``, as for
    ``capture``."""
    from ..capture.recorder import record

    engine = open_engine(spec, isolate=False, **engine_options)
    announce(f"lockstep: loading {spec}")
    with engine:
        ids = _prompt_ids(engine, prompts, tokens)
        joins = join_steps(len(ids), join_at)
        how = "packed" if engine.batch_packed else f"{padding} padding"
        announce(f"lockstep: recording {len(ids)} prompts as one batch ({how}"
                 + (f", the last joining at step {join_at}" if join_at else "")
                 + f") + {decode} decode steps into {out}")
        meta = {**engine.meta(), "decode": decode}
        with record(out, meta=meta, overwrite=overwrite, data=data,
                    **_selection(selection)) as rec:
            chosen = engine.generate_batch(rec, ids, decode, forced=forced, padding=padding,
                                           join_at=joins)
            # what lockstep asked for and got back: whose token is whose is found from it
            # and the ids each step was fed (batching.infer), or checked against it
            rec.add_meta(**{REQUEST_KEY: {
                "prompts": ids, "join_at": joins,
                "forced_token_ids": [list(f) if f is not None else None
                                     for f in (forced or [None] * len(ids))],
                "generated_token_ids": [list(c) for c in chosen]}})
    return chosen


def batch_diff(ref_spec: str, cand_spec: str, out: str | Path, *,
               prompts: Sequence[str] | None = None,
               tokens: Sequence[Sequence[int]] | None = None, decode: int = 0,
               padding: str = "left", join_at: int | None = None, free_running: bool = False,
               ref_options: dict[str, Any] | None = None,
               cand_options: dict[str, Any] | None = None,
               tolerances: Tolerances | None = None, mapping: Any = None,
               selection: dict[str, Any] | None = None,
               announce: Callable[[str], Any] = lambda m: None) -> BatchComparison:
    """Record the reference on each prompt alone (``out``/reference-I.lsd), the candidate on
    all of them as one batch (``out``/candidate.lsd, split into candidate-I.lsd), and
    compare each sequence with its reference. ``selection``: which records both keep."""
    out = Path(out)
    count = len(tokens or prompts or ())
    joins = join_steps(count, join_at)
    candidate = open_engine(cand_spec, isolate=False, **(cand_options or {}))
    if not candidate.can_batch():  # said before the reference runs
        raise candidate.no_batch()
    engine = open_engine(ref_spec, **(ref_options or {}))
    announce(f"lockstep: loading {ref_spec}")
    refs: list[Path] = []
    with engine:
        ids = _prompt_ids(engine, prompts, tokens)
        for i, prompt in enumerate(ids):
            refs.append(out / f"reference-{i}.lsd")
            announce(f"lockstep: recording the reference on prompt {i} alone "
                     f"({len(prompt)} tokens + {decode} decode steps)")
            engine.record_run(refs[-1], {**engine.meta(), "prompt_token_ids": prompt,
                                         "decode": decode}, prompt, decode, overwrite=True,
                              **_selection(selection))
    forced: list[list[int] | None] = []
    for path in refs:
        with open_dump(path) as ref:
            forced.append(None if free_running else
                          list(ref.meta.get("generated_token_ids") or fed_tokens(ref) or []))
    batched = out / "candidate.lsd"
    capture_batch(cand_spec, batched, tokens=ids, decode=decode, forced=forced,
                  padding=padding, join_at=joins[-1] or None, overwrite=True,
                  selection=selection, announce=announce, **(cand_options or {}))
    with open_dump(batched) as dump:  # as it ran: when each joined (an idle batch moves
        layout = layout_of(dump)      # arrivals up), padded or packed, what else it did
    parts = split_batch(batched, out, references=[str(p) for p in refs], layout=layout)
    results = tuple(compare(r, c, tolerances, mapping=mapping) for r, c in zip(refs, parts))
    return BatchComparison(results, tuple(tuple(p) for p in ids), layout.padding,
                           layout.join_at, layout_notes(layout))
