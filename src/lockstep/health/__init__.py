"""Health checks of one dump, with no reference: the red flags of an engine that prints
garbage (docs/check.md). Numpy only.

    report = check_dump("run.lsd")        # HealthReport: truthy when there is no red flag
    for flag in report.flags: print(flag.level, flag.message)
"""

from __future__ import annotations

import os

from ..store import open_dump
from .checks import CHECKS
from .flags import INFO, RED, Checked, CheckResult, Flag, HealthReport
from .view import DumpView

__all__ = ["check_dump", "HealthReport", "Flag", "Checked", "CheckResult", "CHECKS", "RED",
           "INFO"]


def check_dump(path: str | os.PathLike[str], step: int | None = None) -> HealthReport:
    """Run every check on the dump at ``path``; ``step``: only that step (a check may still
    read the step before it; a step the dump lacks gives a report of no steps). Raises
    DumpError for an unreadable dump."""
    with open_dump(path) as dump:
        view = DumpView(dump, step)
        flags: list[Flag] = []
        checked: dict[str, Checked] = {}
        for name, check in CHECKS.items():
            result = check(view)
            flags.extend(result.flags)
            checked[name] = result.checked
        return HealthReport(str(path), tuple(view.steps), tuple(view.all_steps),
                            sum(len(view.in_step(s)) for s in view.steps), tuple(flags),
                            checked)
