"""The terminal view of an InspectReport (rich)."""

from __future__ import annotations

from typing import Any

from .doctor import InspectReport

__all__ = ["render"]


def _fmt(x: Any) -> str:
    return "-" if x is None else f"{x:.4g}"


def render(report: InspectReport) -> list[Any]:
    """Renderables: a header line, the component table, and the bad tensors (if any)."""
    from rich.table import Table
    from rich.text import Text

    out: list[Any] = []
    n_bad = len(report.bad)
    out.append(Text(f"{report.path}: {report.kind}, {len(report.tensors)} tensors, "
                    f"{sum(t.elements for t in report.tensors):,} elements, "
                    f"{n_bad} bad", style="bold red" if n_bad else "bold"))
    if report.adapter:
        a = report.adapter
        out.append(Text(f"adapter: r={a.get('r')} lora_alpha={a.get('lora_alpha')} "
                        f"target_modules={a.get('target_modules')}"))
    table = Table(title="by component")
    for col in ("component", "tensors", "elements", "bad tensors", "NaN", "Inf"):
        table.add_column(col, justify="left" if col == "component" else "right")
    for row in report.components():
        style = "red" if row["bad_tensors"] else None
        table.add_row(row["component"], str(row["tensors"]), f"{row['elements']:,}",
                      str(row["bad_tensors"]), str(row["nan"]), str(row["inf"]), style=style)
    out.append(table)
    if n_bad:
        bad = Table(title="bad tensors (NaN or Inf)")
        for col in ("name", "component", "dtype", "shape", "NaN", "Inf", "min", "max"):
            bad.add_column(col)
        for t in report.bad:
            s = t.stats
            bad.add_row(t.name, t.component, t.dtype, "x".join(map(str, t.shape)),
                        str(s["nan"]), str(s["inf"]), _fmt(s["min"]), _fmt(s["max"]))
        out.append(bad)
    return out
