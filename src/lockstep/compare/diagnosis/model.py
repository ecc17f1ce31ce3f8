"""What a diagnosis is: the ``Diagnosis`` record, ``make`` (its detail made JSON-safe), and
``Rule``, one test of the first divergence that gives a Diagnosis of its own kinds or None.

A rule module defines one test and marks it with the kinds it gives::

    @rule("nan")
    def nan(case: Case) -> Diagnosis | None:
        ...

The rules and their order are ``registry.RULES``; ``registry.KINDS`` is read off them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Mapping, Sequence

from ...jsontext import json_safe

if TYPE_CHECKING:
    from ..case import Case

__all__ = ["Diagnosis", "Rule", "make", "rule"]


@dataclass(frozen=True)
class Diagnosis:
    """What kind of problem the first divergence is, why we think so, and what to check."""

    kind: str  #: one of registry.KINDS: the kinds the rules give
    title: str  #: one line a person acts on, with the numbers
    checks: tuple[str, ...]  #: what to check, most likely first
    evidence: tuple[str, ...]  #: sentences with the measured figures
    detail: Mapping[str, Any] = field(default_factory=dict)  #: machine-readable, JSON-safe

    def as_dict(self) -> dict[str, Any]:
        """The diagnosis as the JSON report writes it."""
        return {"kind": self.kind, "title": self.title, "checks": list(self.checks),
                "evidence": list(self.evidence), "detail": dict(self.detail)}


@dataclass(frozen=True)
class Rule:
    """One test of the case: a Diagnosis of one of ``kinds``, or None when it does not fit."""

    kinds: tuple[str, ...]  #: the kinds of Diagnosis this rule gives
    test: Callable[[Case], Diagnosis | None]

    @property
    def name(self) -> str:
        return self.test.__name__

    def __call__(self, case: Case) -> Diagnosis | None:
        found = self.test(case)
        if found is not None and found.kind not in self.kinds:
            raise AssertionError(f"the {self.name} rule gave a {found.kind!r} diagnosis; "
                                 f"it declares {self.kinds}")
        return found


def rule(*kinds: str) -> Callable[[Callable[[Case], Diagnosis | None]], Rule]:
    """Decorator: the function is a Rule giving Diagnoses of ``kinds``."""
    def wrap(test: Callable[[Case], Diagnosis | None]) -> Rule:
        return Rule(kinds, test)
    return wrap


def make(kind: str, title: str, checks: Sequence[str], evidence: Sequence[str],
         **detail: Any) -> Diagnosis:
    """A Diagnosis with its detail made JSON-safe."""
    return Diagnosis(kind, title, tuple(checks), tuple(evidence), json_safe(detail))
