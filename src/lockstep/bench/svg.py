"""A self-contained SVG chart of the per-module times: one row per module kind, the reference's
and the candidate's bars side by side. No plotting library: plain SVG text."""

from __future__ import annotations

import os
from html import escape
from typing import Any

__all__ = ["module_chart"]

_COLORS = {"reference": "#4c72b0", "candidate": "#dd8452"}


def module_chart(modules: dict[str, dict[str, Any]], path: str | os.PathLike[str], *,
                 title: str = "time per module kind (ms, median)") -> None:
    """Write the chart of ``BenchResult.modules`` (sides without module times are left out)."""
    sides = [s for s in ("reference", "candidate") if modules.get(s, {}).get("available")]
    kinds: list[str] = []
    for side in sides:
        for kind in modules[side]["by_kind"]:
            if kind not in kinds:
                kinds.append(kind)
    rows = kinds + (["outside modules"] if sides else [])

    def value(side: str, row: str) -> float:
        m = modules[side]
        return m["outside_modules_ms"] if row == "outside modules" else m["by_kind"].get(row, 0.0)

    top = max([value(s, r) for s in sides for r in rows] or [1.0]) or 1.0
    label_w, bar_w, row_h, bar_h = 150, 420, 34, 12
    height = 60 + row_h * len(rows) + 30
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{label_w + bar_w + 110}" '
             f'height="{height}" font-family="sans-serif" font-size="12">',
             f'<text x="10" y="20" font-size="14" font-weight="bold">{escape(title)}</text>']
    for i, side in enumerate(sides):
        x = label_w + i * 140
        parts.append(f'<rect x="{x}" y="32" width="12" height="12" fill="{_COLORS[side]}"/>'
                     f'<text x="{x + 16}" y="43">{escape(side)}</text>')
    for r, row in enumerate(rows):
        y = 60 + r * row_h
        parts.append(f'<text x="10" y="{y + bar_h + 2}">{escape(row)}</text>')
        for i, side in enumerate(sides):
            v = value(side, row)
            w = bar_w * v / top
            by = y + i * (bar_h + 2)
            parts.append(f'<rect x="{label_w}" y="{by}" width="{w:.1f}" height="{bar_h}" '
                         f'fill="{_COLORS[side]}"><title>{escape(side)} {escape(row)}: '
                         f'{v:.3f} ms</title></rect>'
                         f'<text x="{label_w + w + 4:.1f}" y="{by + bar_h - 2}" '
                         f'font-size="10">{v:.2f}</text>')
    if not sides:
        parts.append('<text x="10" y="70">no module times: neither engine has a module tree'
                     '</text>')
    parts.append("</svg>")
    with open(path, "w", encoding="utf-8") as f:
        f.write("\n".join(parts) + "\n")
