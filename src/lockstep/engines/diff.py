"""``lockstep diff``: record a reference engine and a candidate engine on the same tokens,
then compare them.

The candidate sees exactly the reference's prompt token ids and, by default, is teacher-forced
with the reference's greedy tokens, so one near-tie cannot make every later step
incomparable. ``dump:DIR`` uses an existing recording instead of running an engine.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Sequence

from ..compare import Comparison, Tolerances, compare
from ..errors import UsageError
from ..store.reader import open_dump
from .capture import capture

if TYPE_CHECKING:
    from ..align.mapping import MappingFile

__all__ = ["diff"]


def _existing(spec: str) -> Path | None:
    if spec.startswith("dump:"):
        return Path(spec[len("dump:"):])
    return None


def _fed_tokens(dump: Any) -> list[int] | None:
    """The token fed at each decode step, read from the ``input_ids`` records."""
    fed = []
    for step in dump.steps[1:]:
        rec = dump.get(step, "input_ids")
        if rec is None or rec.numel != 1:
            return None
        fed.append(int(dump.read(rec).reshape(-1)[0]))
    return fed


def diff(ref_spec: str, cand_spec: str, out: str | Path, *, prompt: str | None = None,
         tokens: Sequence[int] | None = None, decode: int = 0, free_running: bool = False,
         ref_options: dict[str, Any] | None = None, cand_options: dict[str, Any] | None = None,
         tolerances: Tolerances | None = None, mapping: MappingFile | None = None,
         overwrite: bool = True,
         announce: Callable[[str], Any] = lambda m: None) -> Comparison:
    """Record both engines into ``out``/reference.lsd and ``out``/candidate.lsd; compare."""
    out = Path(out)
    ref_dump = _existing(ref_spec)
    if ref_dump is None:
        ref_dump = out / "reference.lsd"
        capture(ref_spec, str(ref_dump), prompt=prompt, tokens=tokens, decode=decode,
                overwrite=overwrite, announce=announce, **(ref_options or {}))
    with open_dump(ref_dump) as ref:
        ids = ref.meta.get("prompt_token_ids")
        decode = int(ref.meta.get("decode", max(ref.steps, default=0)))
        forced = ref.meta.get("generated_token_ids") or _fed_tokens(ref)
    cand_dump = _existing(cand_spec)
    if cand_dump is None:
        if not ids:
            raise UsageError(f"{ref_dump} has no prompt_token_ids in its metadata, so the "
                             "candidate cannot be fed the same tokens")
        cand_dump = out / "candidate.lsd"
        capture(cand_spec, str(cand_dump), tokens=ids, decode=decode,
                forced=None if free_running else forced, overwrite=overwrite,
                announce=announce, **(cand_options or {}))
    return compare(ref_dump, cand_dump, tolerances, mapping=mapping)
