"""What ``lockstep fuzz`` found: the minimal failing inputs, each localized, grouped by first
divergence. Frozen, numpy only."""

from __future__ import annotations

import itertools
from dataclasses import dataclass, replace
from typing import Any

from ..jsontext import json_number
from .inputs import BatchInput, FuzzInput, Space

__all__ = ["Failure", "Finding", "FuzzResult", "Group"]


@dataclass(frozen=True)
class Failure:
    """How one input failed: a divergence (at ``step``, with its KL) or a crash."""

    kind: str  #: "diverged" or "crash"
    step: int | None = None  #: the first failing step (0: the prefill)
    kl: float | None = None  #: KL(reference || candidate) there, nats
    why: str = ""  #: "real split", "KL over the limit", "decode unlike its own prefill"
    error: str | None = None  #: a crash's exception, ``Type: message``
    sequence: int | None = None  #: in a batch input, the sequence that failed first

    @property
    def origin(self) -> str:
        """What a shrunk input must still show: a divergence, or the same exception type."""
        return "diverged" if self.kind == "diverged" else (self.error or "").split(":")[0]


@dataclass(frozen=True)
class Finding:
    """One minimal failing input and where the tensor comparison put it."""

    input: FuzzInput | BatchInput  #: the smallest input found that still fails
    failure: Failure
    #: the failing input it was shrunk from (a batch whose failure one sequence shows
    #: alone shrinks to a single-sequence input)
    found_from: FuzzInput | BatchInput
    shrink_checks: int  #: checks the shrinking took
    tensor: str | None = None  #: the first divergent tensor (None: a crash, or none found)
    tensor_step: int | None = None
    verdict: str | None = None  #: the tensor comparison's verdict
    diagnosis: str | None = None  #: its diagnosis kind
    title: str | None = None  #: and one line
    out: str | None = None  #: where both dumps are
    localize_error: str | None = None  #: why it could not be localized
    sequence: int | None = None  #: a batch's first sequence the tensor comparison diverged
    named: tuple[int, ...] = ()  #: the sequence pair its batch diagnosis names
    #: set when the tensor comparison, replaying every op, measured the candidate's own
    #: precision amplified by this input (lockstep.replay.audit): drift, not a failure
    precision: str | None = None
    shrunk_from: int = 1  #: failing inputs that shrank to this one

    def located(self, out: str, verdict: str, first: Any, diagnosis: Any,
                **more: Any) -> Finding:
        """This finding with what the tensor comparison under ``out`` found: its verdict,
        ``first`` (the first divergent pair, or None) and ``diagnosis`` (or None)."""
        return replace(self, out=out, verdict=verdict,
                       tensor=(first.canonical or first.ref_name) if first else None,
                       tensor_step=first.step if first else None,
                       diagnosis=diagnosis.kind if diagnosis else None,
                       title=diagnosis.title if diagnosis else None, **more)

    @property
    def real(self) -> bool:
        """A failure, not the candidate's precision amplified."""
        return self.precision is None

    @property
    def group(self) -> str:
        """The first divergence it belongs with: ``step 0 layers.0.attn_heads``, or the
        crash's exception type."""
        if self.failure.kind == "crash":
            return f"crash: {self.failure.origin}"
        if not self.real:
            return "the candidate's precision, amplified (drift)"
        batch = "batch, " if isinstance(self.input, BatchInput) else ""
        if self.tensor is None:
            return f"{batch}no divergent tensor found"
        return f"{batch}step {self.tensor_step} {self.tensor}"

    def to_json(self) -> dict[str, Any]:
        f = self.failure
        return {"input": self.input.to_json(), "kind": f.kind, "step": f.step,
                "kl": json_number(f.kl) if f.kl is not None else None, "why": f.why,
                "error": f.error, "sequence": f.sequence,
                "found_from": self.found_from.to_json(),
                "shrink_checks": self.shrink_checks, "first_divergence": {
                    "step": self.tensor_step, "tensor": self.tensor} if self.tensor else None,
                "verdict": self.verdict, "diagnosis": self.diagnosis, "title": self.title,
                "out": self.out, "localize_error": self.localize_error,
                "diverged_sequence": self.sequence, "sequences_named": list(self.named),
                "precision": self.precision, "shrunk_from": self.shrunk_from}


@dataclass(frozen=True)
class Group:
    name: str
    findings: tuple[Finding, ...]


@dataclass(frozen=True)
class FuzzResult:
    """The search's result; truthy when no input failed."""

    reference: str
    candidate: str
    seed: int
    budget: int
    space: Space
    kl_limit: float  #: a step over this KL (nats) fails: from the baseline's drift
    tried: int  #: inputs checked (shrinking not counted)
    failing: int  #: of those, how many failed
    rejected: tuple[tuple[FuzzInput, str], ...]  #: inputs both engines refused, and why
    findings: tuple[Finding, ...]
    checks: int  #: every check run, shrinking included
    seconds: float
    #: batch inputs the candidate could not run (it cannot batch, pad that side or take a
    #: request mid-decode), and why: skipped, never failed
    skipped: tuple[tuple[BatchInput, str], ...] = ()

    def __bool__(self) -> bool:
        """No failure: no finding, or every failing input shrank to one that the tensor
        comparison measured as the candidate's precision, amplified."""
        return not self.real_findings and self.failing == sum(
            f.shrunk_from for f in self.findings)

    @property
    def real_findings(self) -> tuple[Finding, ...]:
        return tuple(f for f in self.findings if f.real)

    @property
    def groups(self) -> tuple[Group, ...]:
        """The findings grouped by first divergence (or crash), smallest input first."""
        ordered = sorted(self.findings, key=lambda f: (f.group, f.input.key))
        return tuple(Group(name, tuple(items)) for name, items in
                     itertools.groupby(ordered, key=lambda f: f.group))

    def to_json(self) -> dict[str, Any]:
        return {"kind": "fuzz", "reference": self.reference, "candidate": self.candidate,
                "seed": self.seed, "budget": self.budget, "space": self.space.to_json(),
                "kl_limit": json_number(self.kl_limit), "tried": self.tried,
                "failing": self.failing, "checks": self.checks,
                "seconds": round(self.seconds, 3), "ok": bool(self),
                "real_findings": len(self.real_findings),
                "rejected": [{"input": i.to_json(), "error": e} for i, e in self.rejected],
                "skipped": [{"input": i.to_json(), "reason": r} for i, r in self.skipped],
                "groups": [{"first_divergence": g.name,
                            "findings": [f.to_json() for f in g.findings]}
                           for g in self.groups]}
