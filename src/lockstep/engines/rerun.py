"""What it takes to run an engine again as a dump recorded it: the tokens it was fed and the
options its metadata names (for replay and op microbenchmarks)."""

from __future__ import annotations

from typing import Any

from .registry import find_kind

__all__ = ["fed_tokens", "options_from_meta"]


def fed_tokens(dump: Any) -> list[int] | None:
    """The token fed at each decode step, read from the ``input_ids`` records."""
    fed = []
    for step in dump.steps[1:]:
        rec = dump.get(step, "input_ids")
        if rec is None or rec.numel != 1:
            return None
        fed.append(int(dump.read(rec).reshape(-1)[0]))
    return fed


def options_from_meta(spec: str, meta: dict[str, Any],
                      given: dict[str, Any] | None = None) -> dict[str, Any]:
    """The engine options a dump's run used, as far as its metadata says (the kind's
    ``from_meta`` in the registry: the dtype of an ``hf:``/``zoo:`` engine; the zoo's ``bug``
    and ``vm``), then ``given`` over them."""
    found = find_kind(spec)
    names = found.from_meta if found is not None else ()
    out = {key: meta[key] for key in names if meta.get(key) not in (None, False)}
    return {**out, **(given or {})}
