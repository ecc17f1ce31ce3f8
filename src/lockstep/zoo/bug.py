"""One bug of the zoo: what the engine does wrong, and what lockstep should report for it."""

from __future__ import annotations

from dataclasses import dataclass

from ..compare.diagnosis.registry import KINDS

__all__ = ["Bug", "DIAGNOSES"]

#: the diagnosis classes a bug may be expected to be given: every kind the rules give
DIAGNOSES = KINDS


@dataclass(frozen=True)
class Bug:
    """One switchable bug and the report lockstep should give for it."""

    name: str  #: the value of ``bug=``
    description: str  #: what the engine does wrong, in one sentence
    source: str  #: the seed story or public issue thread it reproduces
    phase: str  #: "prefill" or "decode": the part of the engine whose code is wrong
    step: int  #: first divergent step (0 = prefill, 1 = first decode step)
    tensor: str  #: canonical name where it is first seen ("tokens": only the chosen tokens)
    diagnosis: str  #: expected diagnosis class, one of DIAGNOSES
    families: tuple[str, ...] = ("llama", "qwen3")  #: model families it applies to
    #: when it shows, if not always (e.g. past the window); outside it, a run must not diverge
    condition: str | None = None

    def __post_init__(self) -> None:
        if self.phase not in ("prefill", "decode") or self.diagnosis not in DIAGNOSES:
            raise ValueError(f"bug {self.name!r}: bad phase or diagnosis")
