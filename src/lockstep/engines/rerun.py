"""What it takes to run an engine again as a dump recorded it: the tokens it was fed and the
options its metadata names (for replay and op microbenchmarks)."""

from __future__ import annotations

from typing import Any

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
    """The engine options a dump's run used, as far as its metadata says (the dtype of an
    ``hf:``/``zoo:`` engine; the zoo's ``bug`` and ``vm``), then ``given`` over them."""
    out: dict[str, Any] = {}
    if spec.startswith(("hf:", "zoo:")) and isinstance(meta.get("dtype"), str):
        out["dtype"] = meta["dtype"]
    if spec.startswith("zoo:"):
        for key in ("bug", "vm"):
            if meta.get(key) not in (None, False):
                out[key] = meta[key]
    return {**out, **(given or {})}
