"""Recording one engine on one prompt: prefill plus N greedy decode steps."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from ..engines import open_engine
from ..errors import UsageError

__all__ = ["capture"]


def capture(spec: str, out: str, *, prompt: str | None = None,
            tokens: Sequence[int] | None = None, decode: int = 0,
            forced: Sequence[int] | None = None, data: bool | str = True,
            overwrite: bool = False, include: Sequence[str] | None = None,
            exclude: Sequence[str] | None = None, layers: Sequence[int] | None = None,
            announce: Callable[[str], Any] = lambda m: None, **engine_options: Any) -> list[int]:
    """Load the engine, record prefill and ``decode`` greedy steps into ``out``; returns the
    greedy token chosen at each step. ``include``: only records whose names match these
    globs (``input_ids`` always); ``exclude``: not these; ``layers``: only these layers'
    records, and those of no layer (capture.selection)."""
    engine = open_engine(spec, **engine_options)
    announce(f"lockstep: loading {spec}")
    with engine:
        ids = list(tokens) if tokens is not None else engine.tokenize(prompt or "")
        if not ids:
            raise UsageError("the prompt has no tokens; give a non-empty --prompt or --tokens")
        meta = {**engine.meta(), "prompt": prompt, "prompt_token_ids": ids, "decode": decode}
        announce(f"lockstep: recording {len(ids)} prompt tokens + {decode} decode steps "
                 f"into {out}")
        chosen = engine.record_run(out, meta, ids, decode, forced=forced, data=data,
                                   overwrite=overwrite,
                                   include=None if include is None else [*include, "input_ids"],
                                   exclude=exclude, layers=layers)
    announce(f"lockstep: done, greedy tokens {chosen}")
    return chosen
