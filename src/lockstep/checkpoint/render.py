"""The ``inspect`` report: an InspectReport (and the adapter's target check, when asked) in
the terminal (rich) and as JSON."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ..display import safe, text
from ..report.base import Report
from ..textfmt import short
from .inspection import InspectReport

if TYPE_CHECKING:
    from rich.console import Console, ConsoleOptions, RenderResult

    from .targets import TargetCheck

__all__ = ["render", "InspectView"]


def render(report: InspectReport) -> list[Any]:
    """Renderables: a header line, the component table, and the bad tensors (if any)."""
    from rich.table import Table

    out: list[Any] = []
    n_bad = len(report.bad)
    unreadable = report.unreadable
    out.append(text(f"{report.path}: {report.kind}, {len(report.tensors)} tensors, "
                    f"{sum(t.elements for t in report.tensors):,} elements, {n_bad} bad"
                    + (f", {len(unreadable)} not readable" if unreadable else ""),
                    style="bold red" if n_bad or unreadable else "bold"))
    if report.adapter:
        a = report.adapter
        out.append(text(f"adapter: r={safe(a.get('r'), 40)} lora_alpha="
                        f"{safe(a.get('lora_alpha'), 40)} target_modules="
                        f"{safe(a.get('target_modules'), 500)}"))
    table = Table(title="by component")
    rows = report.components()
    lora = any("adapter" in row for row in rows)
    for col in ("component", *(("lora",) if lora else ()), "tensors", "elements",
                "bad tensors", "NaN", "Inf"):
        table.add_column(col, justify="left" if col in ("component", "lora") else "right")
    for row in rows:
        style = "red" if row["bad_tensors"] else None
        table.add_row(text(row["component"]), *((text(row.get("adapter", "-")),) if lora else ()),
                      str(row["tensors"]), f"{row['elements']:,}", str(row["bad_tensors"]),
                      str(row["nan"]), str(row["inf"]), style=style)
    out.append(table)
    if n_bad:
        bad = Table(title="bad tensors (NaN or Inf)")
        for col in ("name", "component", "dtype", "shape", "NaN", "Inf", "min", "max"):
            bad.add_column(col)
        for t in report.bad:
            s = t.stats
            bad.add_row(text(t.name), text(t.component), text(t.dtype),
                        "x".join(map(str, t.shape)),
                        str(s["nan"]), str(s["inf"]), short(s["min"], 4), short(s["max"], 4))
        out.append(bad)
    if unreadable:
        table = Table(title="tensors not readable (the others were read)")
        for col in ("name", "dtype", "shape", "why"):
            table.add_column(col)
        for t in unreadable:
            table.add_row(text(t.name), text(t.dtype), "x".join(map(str, t.shape)),
                          text(f"not readable: {t.unreadable}"), style="red")
        out.append(table)
    return out


@dataclass
class InspectView(Report):
    """The inspect report; ``targets``: the PEFT adapter's target_modules checked against
    its base model (``--base``), or None."""

    report: InspectReport
    targets: TargetCheck | None = None
    kind = "inspect"

    def render(self, console: Console, options: ConsoleOptions) -> RenderResult:
        yield from render(self.report)
        for line, style in self.targets.lines() if self.targets is not None else ():
            yield text(line, style=style)

    def to_json(self) -> dict[str, Any]:
        return {**self.report.to_json(), **(
            {} if self.targets is None else {"target_modules": self.targets.to_json()})}
