"""What ``lockstep bench`` measured: per figure, both engines' samples summarised and the
candidate/reference ratio; peak memory; the module breakdowns. Plain data, with ``to_json``."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from .stats import Ratio, Summary, ratio, summarize

__all__ = ["Figure", "BenchResult"]


@dataclass
class Figure:
    """One figure (e.g. "TTFT at 128 tokens") on both engines. Samples are in ``unit``."""

    name: str
    unit: str  #: "ms", "tokens/s"
    reference: Summary
    candidate: Summary
    ratio: Ratio  #: candidate / reference
    lower_is_better: bool = True

    @classmethod
    def of(cls, name: str, unit: str, ref: list[float], cand: list[float], *,
           lower_is_better: bool = True, forks: list[int] | None = None) -> Figure:
        """``forks``: each round's fork (process), the same for both sides' samples."""
        return cls(name, unit, summarize(ref, groups=forks), summarize(cand, groups=forks),
                   ratio(cand, ref, cand_groups=forks, ref_groups=forks), lower_is_better)

    @property
    def noisy(self) -> bool:
        return self.reference.noisy or self.candidate.noisy

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "unit": self.unit, "lower_is_better": self.lower_is_better,
                "reference": self.reference.to_json(), "candidate": self.candidate.to_json(),
                "ratio": self.ratio.to_json(), "noisy": self.noisy}


@dataclass
class BenchResult:
    reference: str  #: engine specs
    candidate: str
    settings: dict[str, Any]
    figures: list[Figure] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)  #: figure -> why it was not measured
    memory: dict[str, dict[str, Any]] = field(default_factory=dict)  #: side -> peak_memory()
    modules: dict[str, dict[str, Any]] = field(default_factory=dict)  #: side -> module_times()
    meta: dict[str, dict[str, Any]] = field(default_factory=dict)  #: side -> engine meta

    @property
    def noisy(self) -> bool:
        """Whether any figure's samples vary too much to trust (see ``stats.NOISY_CV``)."""
        return any(f.noisy for f in self.figures)

    def to_json(self) -> dict[str, Any]:
        return {"reference": self.reference, "candidate": self.candidate,
                "settings": self.settings, "noisy": self.noisy,
                "figures": [f.to_json() for f in self.figures], "skipped": self.skipped,
                "memory": self.memory, "modules": self.modules, "meta": self.meta}
