"""The zoo's score as a table: every bug, where lockstep localized it, and its diagnosis."""

from __future__ import annotations

from typing import Any

from rich.console import Console, ConsoleOptions, RenderResult
from rich.table import Table
from rich.text import Text

from .base import Report

__all__ = ["ZooTable", "zoo_dict"]


class ZooTable(Report):
    """The report of a ``lockstep.zoo.score.ZooScore``; ``to_json()`` is ``zoo_dict``."""

    kind = "zoo"

    def __init__(self, score: Any) -> None:
        self.score = score

    def to_json(self) -> dict[str, Any]:
        return zoo_dict(self.score)

    def render(self, console: Console, options: ConsoleOptions) -> RenderResult:
        table = Table(title="the bug zoo: the mini engine against transformers, one bug at a "
                            "time", title_justify="left", show_lines=False)
        for col in ("", "bug", "lockstep found", "class", "diagnosis"):
            table.add_column(col, overflow="fold")
        for r in self.score.results:
            mark = Text("ok", style="green") if r.ok else Text("MISS", style="bold red")
            found = f"step {r.step} {r.tensor}" if r.step is not None else r.verdict
            if not r.localized:
                found += f"\n(expected step {r.bug.step} {r.bug.tensor})"
            if r.outside is not None:
                found += f"\noutside its condition: {r.outside}"
            kind = r.diagnosis or "-"
            if not r.classified:
                kind += f"\n(expected {r.bug.diagnosis})"
            table.add_row(mark, f"{r.bug.name}\n[dim]{r.family}[/]", found, kind, r.title or "-")
        yield table
        families = list(dict.fromkeys(r.family for r in self.score.results))
        controls = ", ".join(f"{c.family} {c.dtype}: {c.verdict}" for c in self.score.controls)
        total = len(self.score.results)
        style = "bold green" if self.score else "bold red"
        yield Text.assemble((f"{self.score.passed} of {total} bugs localized to their step "
                             f"and tensor with the right diagnosis", style),
                            f"; families: {', '.join(families) or 'none'}",
                            f"; bug-free controls: {controls or 'not run'}; "
                            f"{self.score.seconds:.1f} s")


def zoo_dict(score: Any) -> dict[str, Any]:
    """The zoo's score as JSON: every bug, what lockstep found and what was expected."""
    return {
        "kind": "zoo", "ok": bool(score), "passed": score.passed, "seconds": score.seconds,
        "results": [{"bug": r.bug.name, "family": r.family, "ok": r.ok, "verdict": r.verdict,
                     "step": r.step, "tensor": r.tensor, "diagnosis": r.diagnosis,
                     "title": r.title, "seconds": r.seconds, "localized": r.localized,
                     "classified": r.classified,
                     "expected": {"step": r.bug.step, "tensor": r.bug.tensor,
                                  "diagnosis": r.bug.diagnosis}}
                    for r in score.results],
        "controls": [{"family": c.family, "dtype": c.dtype, "verdict": c.verdict, "ok": c.ok}
                     for c in score.controls],
    }
