"""The report of a batched run compared sequence by sequence (``lockstep diff --batch``):
one line per sequence, then the first diverged sequence's comparison in full."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from rich.console import Console, ConsoleOptions, RenderResult
from rich.table import Table
from rich.text import Text

from .base import Report
from .json_report import report_dict
from .terminal import VERDICT_STYLE, ComparisonReport

__all__ = ["BatchReport"]


@dataclass
class BatchReport(Report):
    """Renders a ``batching.result.BatchComparison``. The JSON face holds every sequence's
    report; the HTML page draws the sequence shown in full (the first diverged one, else
    sequence 0)."""

    batch: Any
    rows: int = 40
    kind = "comparison"  #: the HTML page draws the focus sequence's comparison

    @property
    def focus(self) -> int:
        diverged = self.batch.diverged
        return diverged[0] if diverged else 0

    def to_json(self) -> dict[str, Any]:
        b = self.batch
        return {"kind": "batch", "verdict": b.verdict, "padding": b.padding,
                "join_at": list(b.join_at), "notes": list(b.notes), "diverged": b.diverged,
                "sequences": [{"sequence": i, "prompt_token_ids": list(b.prompts[i]),
                               "report": report_dict(c)} for i, c in enumerate(b.sequences)]}

    def html_json(self) -> dict[str, Any]:
        return report_dict(self.batch.sequences[self.focus])

    def render(self, console: Console, options: ConsoleOptions) -> RenderResult:
        b = self.batch
        joins = [f"sequence {i} joins at step {s}" for i, s in enumerate(b.join_at) if s]
        how = f"{b.padding} padding" if b.padding else \
            "packed (whose token is whose found from the ids fed)"
        yield Text.assemble(("batch: ", "bold"), f"{len(b.sequences)} prompts as one batch, "
                            + how + "".join(f"; {j}" for j in joins)
                            + "; each compared with its prompt run alone")
        for note in b.notes:
            yield Text(f"  {note}")
        table = Table(show_lines=False, title_justify="left")
        for col in ("sequence", "prompt", "verdict", "first divergence", "diagnosis"):
            table.add_column(col, overflow="fold")
        for i, c in enumerate(b.sequences):
            f, d = c.first_divergence, c.diagnosis
            where = f"step {f.step} {f.canonical or f.ref_name}" if f is not None else "-"
            table.add_row(str(i), Text(f"{len(b.prompts[i])} tokens"),
                          Text(c.verdict, style=VERDICT_STYLE[c.verdict]), Text(where),
                          Text(f"{d.kind}: {d.title}" if d is not None else "-"))
        yield table
        style = VERDICT_STYLE[b.verdict]
        named = ", ".join(str(i) for i in b.diverged)
        yield Text.assemble((b.verdict.upper(), style), "  ",
                            f"sequences diverged: {named}" if named else
                            "no sequence diverged from its solo run")
        if b.diverged:
            yield Text("")
            yield Text(f"sequence {self.focus} in full", style="bold underline")
            yield ComparisonReport(b.sequences[self.focus], rows=self.rows)
