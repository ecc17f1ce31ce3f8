"""What a health check reports: flags (red, or information) and what each check looked at."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

__all__ = ["Flag", "Checked", "CheckResult", "HealthReport", "RED", "INFO", "steps_text"]

RED, INFO = "red", "info"


@dataclass(frozen=True)
class Flag:
    """One thing seen in a dump that a healthy model does not do (``red``), or worth saying
    (``info``)."""

    check: str  #: the check that raised it ("nonfinite", "constant", ...)
    level: str  #: RED or INFO
    message: str  #: what was seen, with its values
    step: int | None = None  #: the first step where it was seen
    record: str | None = None  #: the first record where it was seen
    seq: int | None = None  #: that record's capture number
    steps: tuple[int, ...] = ()  #: every step where it was seen
    figures: dict[str, Any] = field(default_factory=dict)  #: the numbers that decided it

    @property
    def red(self) -> bool:
        return self.level == RED

    def to_json(self) -> dict[str, Any]:
        return {"check": self.check, "level": self.level, "step": self.step,
                "steps": list(self.steps), "record": self.record, "seq": self.seq,
                "message": self.message, "figures": self.figures}


@dataclass(frozen=True)
class Checked:
    """What one check looked at: how many records, the extreme figures it saw (on a healthy
    dump, how far from its threshold it stayed), and why it looked at nothing, if so."""

    records: int = 0  #: records (or record pairs, groups) examined
    figures: dict[str, Any] = field(default_factory=dict)
    note: str = ""  #: why records were skipped or nothing was examined

    def to_json(self) -> dict[str, Any]:
        return {"records": self.records, "figures": self.figures, "note": self.note}


@dataclass(frozen=True)
class CheckResult:
    """One check's answer."""

    flags: tuple[Flag, ...]
    checked: Checked


@dataclass(frozen=True)
class HealthReport:
    """Every check's flags on one dump; truthy when there is no red flag."""

    dump: str
    steps: tuple[int, ...]  #: the steps checked
    all_steps: tuple[int, ...]  #: every step the dump holds
    records: int  #: records in those steps
    flags: tuple[Flag, ...]
    checked: dict[str, Checked]

    @property
    def red(self) -> list[Flag]:
        return [f for f in self.flags if f.red]

    def __bool__(self) -> bool:
        return not self.red

    def to_json(self) -> dict[str, Any]:
        return {"dump": self.dump, "steps": list(self.steps), "records": self.records,
                "red_flags": len(self.red), "flags": [f.to_json() for f in self.flags],
                "checked": {name: c.to_json() for name, c in self.checked.items()}}


def steps_text(steps: tuple[int, ...] | list[int]) -> str:
    """"step 3", or "steps 1, 2, 3" (the first eight)."""
    if len(steps) == 1:
        return f"step {steps[0]}"
    return f"steps {', '.join(map(str, steps[:8]))}{' ...' if len(steps) > 8 else ''}"
