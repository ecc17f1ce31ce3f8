"""``capture --dry-run``: what a capture would write, from a real pass that writes no data.

The engine runs the same prompt, decode steps and selection as the capture would, recording
through a writer that writes each index line and counts the data instead of writing it
(store.sizing): the records, their shapes and dtypes, the padding and the tensors stored
once under two names are those of the real dump. A stats-only estimate records a real
stats-only dump (it holds no data anyway). Everything is written under a temporary folder,
removed at the end.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from ..store.claim import INDEX_FILE
from ..store.sizing import SIZES
from ..textfmt import size
from .capture import capture

__all__ = ["StepSize", "Estimate", "estimate", "dump_sizes"]


@dataclass(frozen=True)
class StepSize:
    step: int
    records: int
    data_bytes: int  #: data.bin bytes, padding included
    index_bytes: int  #: index.jsonl bytes of its records

    @property
    def total(self) -> int:
        return self.data_bytes + self.index_bytes


@dataclass(frozen=True)
class Estimate:
    """Bytes per step of a capture, and in all."""

    spec: str
    prompt_tokens: int
    decode: int
    stats_only: bool
    steps: tuple[StepSize, ...]
    fixed_bytes: int  #: header, metadata and end lines

    @property
    def total(self) -> int:
        return self.fixed_bytes + sum(s.total for s in self.steps)

    @property
    def per_decode_step(self) -> float:
        """Mean bytes of a decode step (0 without decode steps)."""
        decode = [s.total for s in self.steps if s.step > 0]
        return sum(decode) / len(decode) if decode else 0.0

    def lines(self) -> list[str]:
        kind = "stats-only " if self.stats_only else ""
        out = [f"lockstep: dry run of {self.spec}: a {kind}capture of {self.prompt_tokens} "
               f"prompt tokens + {self.decode} decode steps would write (nothing was kept):"]
        for s in self.steps:
            what = f"prefill, {self.prompt_tokens} tokens" if s.step == 0 else "decode"
            out.append(f"  step {s.step} ({what}): {s.records} records, {size(s.total)} "
                       f"(data {size(s.data_bytes)}, index {size(s.index_bytes)})")
        if self.decode:
            out.append(f"  each decode step: {size(self.per_decode_step)} on average")
        out.append(f"  total for --decode {self.decode}: {size(self.total)} "
                   f"({self.total} bytes; header and metadata {size(self.fixed_bytes)})")
        return out

    def to_json(self) -> dict[str, Any]:
        return {"spec": self.spec, "prompt_tokens": self.prompt_tokens, "decode": self.decode,
                "stats_only": self.stats_only, "total_bytes": self.total,
                "fixed_bytes": self.fixed_bytes, "per_decode_step_bytes": self.per_decode_step,
                "steps": [{"step": s.step, "records": s.records, "data_bytes": s.data_bytes,
                           "index_bytes": s.index_bytes} for s in self.steps]}


def dump_sizes(path: str | os.PathLike[str]) -> tuple[tuple[StepSize, ...], int]:
    """Each step's bytes in a dump's index (data ends counted from offsets, not data.bin),
    and the bytes of its other lines. Reads only the index: a sized dump has no data."""
    steps: dict[int, list[int]] = {}  # step -> [records, data bytes, index bytes]
    fixed = 0
    end = 0  # the end of data.bin so far
    with open(os.path.join(path, INDEX_FILE), "rb") as f:
        for raw in f:
            obj = json.loads(raw)
            if obj.get("type") != "tensor":
                fixed += len(raw)
                continue
            row = steps.setdefault(int(obj["step"]), [0, 0, 0])
            row[0] += 1
            row[2] += len(raw)
            if obj.get("offset") is not None:
                new_end = max(end, int(obj["offset"]) + int(obj["nbytes"]))
                row[1] += new_end - end
                end = new_end
    return tuple(StepSize(k, *v) for k, v in sorted(steps.items())), fixed


def estimate(spec: str, *, prompt: str | None = None, tokens: Sequence[int] | None = None,
             decode: int = 0, data: bool = True, include: Sequence[str] | None = None,
             exclude: Sequence[str] | None = None, layers: Sequence[int] | None = None,
             announce: Callable[[str], Any] = lambda m: None,
             **engine_options: Any) -> Estimate:
    """What ``capture`` with these arguments would write, per step (see the module doc)."""
    announce(f"lockstep: dry run: one pass of {spec} that writes no data")
    with tempfile.TemporaryDirectory(prefix="lockstep-dry-run-") as tmp:
        out = os.path.join(tmp, "sizes.lsd")
        capture(spec, out, prompt=prompt, tokens=tokens, decode=decode,
                data=SIZES if data else False, include=include, exclude=exclude,
                layers=layers, **engine_options)
        steps, fixed = dump_sizes(out)
        with open(os.path.join(out, INDEX_FILE), "rb") as f:
            ids = json.loads(f.readline())["meta"].get("prompt_token_ids") or []
    return Estimate(spec, len(ids), decode, not data, steps, fixed)
