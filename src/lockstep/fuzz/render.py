"""The terminal face of ``lockstep fuzz``: the smallest failing inputs, grouped by first
divergence, each with its diagnosis."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from rich.console import Console, ConsoleOptions, RenderResult
from rich.table import Table
from rich.text import Text

from ..report.base import Report
from ..textfmt import fmt
from .result import Finding, FuzzResult

__all__ = ["FuzzReport"]


def _failure(f: Finding) -> Text:
    failure = f.failure
    if failure.kind == "crash":
        return Text(f"crash: {failure.error}", style="bold red")
    kl = f", KL {fmt(failure.kl)}" if failure.kl is not None else ""
    seq = f"sequence {failure.sequence}, " if failure.sequence is not None else ""
    return Text(f"{seq}step {failure.step}: {failure.why}{kl}", style="red")


def _diagnosis(f: Finding) -> Text:
    if f.failure.kind == "crash":
        return Text("crash")
    if f.localize_error:
        return Text("not localized")
    if f.precision:
        return Text("precision, amplified")
    named = f" (sequences {', '.join(map(str, f.named))})" if f.named else ""
    return Text(f"{f.diagnosis or (f.verdict or 'not compared')}{named}")


def _notes(findings: tuple[Finding, ...]) -> list[Text]:
    """Each distinct diagnosis (or why there is none) once, in full, under the table."""
    lines: dict[str, Text] = {}
    for f in findings:
        if f.failure.kind == "crash":
            line = Text("the engine raised: no tensors to compare")
        elif f.localize_error:
            line = Text(f"not localized: {f.localize_error}")
        elif f.precision:
            line = Text.assemble(("drift: ", "bold"), f.precision)
        elif f.diagnosis:
            seq = f"sequence {f.sequence}: " if f.sequence is not None else ""
            line = Text.assemble((f"{f.diagnosis}: ", "bold"), seq, f.title or "")
        else:
            line = Text(f"tensor comparison: {f.verdict or 'not run'}, no divergent tensor")
        lines.setdefault(line.plain, line)
    if findings and findings[0].out:
        lines["dumps"] = Text(f"dumps: {findings[0].out} (and one directory per finding)",
                              style="dim")
    return list(lines.values())


@dataclass
class FuzzReport(Report):
    """The fuzz search's report."""

    result: FuzzResult
    kind = "fuzz"

    def render(self, console: Console, options: ConsoleOptions) -> RenderResult:
        r = self.result
        space = r.space
        yield Text.assemble("reference  ", Text(r.reference), "\ncandidate  ", Text(r.candidate))
        yield Text(f"{r.tried} inputs tried (budget {r.budget}, seed {r.seed}), {r.checks} "
                   f"checks (shrinking included), {r.seconds:.1f} s; lengths up to "
                   f"{space.max_length} (context {space.context or 'unknown'}, KV block "
                   f"{space.block or 'unknown'}); a step over KL {fmt(r.kl_limit)} fails")
        if r.rejected:
            yield Text(f"{len(r.rejected)} input(s) both engines refused, e.g. "
                       f"{r.rejected[0][0].describe()}: {r.rejected[0][1]}", style="dim")
        if r.skipped:
            reasons = sorted({reason for _, reason in r.skipped})
            yield Text(f"{len(r.skipped)} batch input(s) skipped (the candidate cannot run "
                       f"them): {'; '.join(reasons)}", style="yellow")
        if not r.findings:
            yield Text("no failing input: every input matched or drifted", style="bold green")
            return
        amplified = len(r.findings) - len(r.real_findings)
        if r:
            yield Text(f"no failure: {r.failing} input(s) parted from the reference only "
                       "through the candidate's own precision, amplified by the input "
                       "(drift, measured by replaying every op)", style="bold yellow")
        else:
            unshrunk = r.failing - sum(f.shrunk_from for f in r.findings)
            yield Text(f"{r.failing} failing input(s), shrunk to {len(r.findings)} minimal "
                       f"input(s) in {len(r.groups)} group(s)"
                       + (f"; {amplified} of them the candidate's precision, amplified"
                          if amplified else "")
                       + (f"; {unshrunk} not shrunk or localized" if unshrunk else ""),
                       style="bold red")
        for group in r.groups:
            title = group.name if group.name.startswith("crash") else \
                f"first divergence: {group.name}"
            table = Table(title=Text(title), title_justify="left",
                          show_lines=False)
            table.add_column("minimal input")
            table.add_column("fails")
            table.add_column("diagnosis")
            for f in group.findings:
                table.add_row(Text(f.input.describe()), _failure(f), _diagnosis(f))
            yield table
            yield from _notes(group.findings)

    def to_json(self) -> dict[str, Any]:
        return self.result.to_json()
