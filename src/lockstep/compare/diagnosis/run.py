"""Running the rules on the case: the first Diagnosis a rule gives wins (``registry``)."""

from __future__ import annotations

import os
import warnings
from typing import Sequence

from ..case import Case
from .model import Diagnosis, Rule
from .registry import RULES

__all__ = ["diagnose", "diagnose_safely", "STRICT_ENV"]

#: set (to anything but "" or "0") to make a failing diagnosis raise instead of warn
STRICT_ENV = "LOCKSTEP_STRICT"


def diagnose(case: Case, rules: Sequence[Rule] = RULES) -> Diagnosis | None:
    """What kind of problem the case's first divergence is: the first of ``rules`` (in
    order) that gives a Diagnosis, or None when none does."""
    for r in rules:
        found = r(case)
        if found is not None:
            return found
    return None


def strict_from_env() -> bool:
    """Whether ``LOCKSTEP_STRICT`` asks for a failing diagnosis to raise."""
    return os.environ.get(STRICT_ENV, "") not in ("", "0")


def diagnose_safely(case: Case, rules: Sequence[Rule] = RULES, *,
                    strict: bool | None = None) -> Diagnosis | None:
    """``diagnose``, but a bug in it never costs the comparison: it warns and gives None.
    With ``strict`` (None: when ``LOCKSTEP_STRICT`` is set) the error is raised instead."""
    try:
        return diagnose(case, rules)
    except Exception as exc:
        if strict_from_env() if strict is None else strict:
            raise
        warnings.warn(f"lockstep: the diagnosis failed ({type(exc).__name__}: {exc}); the "
                      "comparison itself is complete", RuntimeWarning, stacklevel=2)
        return None
