"""The ``align`` report: how two dumps' records pair (one step's pairs, how each was found,
what stayed unpaired) in the terminal (rich), and every step's pairs as JSON."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Any, Iterator

from rich.console import Console, ConsoleOptions, RenderResult
from rich.table import Table
from rich.text import Text

from ..display import text
from ..report.base import Report

__all__ = ["AlignReport"]

_HOWS = ("name", "mapping", "table", "normalized", "structure", "order")


def _transforms(pair: Any) -> str:
    parts = []
    if pair.cand_transform:
        parts.append(f"cand {pair.cand_transform}")
    if pair.ref_transform:
        parts.append(f"ref {pair.ref_transform}")
    return "\n".join(parts) or "-"


def _confidence(pair: Any) -> str:
    value = getattr(pair, "confidence", None)
    return "-" if value is None else f"{value:.2f}"


def _render(alignment: Any, step: int, steps: list[int]) -> Iterator[Any]:
    """The rich renderables: a line on the name tables, a per-step summary, the step's
    pairs, its unpaired names."""
    tables = getattr(alignment, "tables", None)
    if tables:
        yield Text(f"name tables: {tables[0]} (reference), {tables[1]} (candidate)")
    ignored = getattr(alignment, "ignored", 0)
    if ignored:
        yield Text(f"left out by the mapping file: {ignored} records")
    hows = [h for h in _HOWS if any(p.how == h for p in alignment.pairs)]
    hows += sorted({p.how for p in alignment.pairs} - set(hows))
    summary = Table(title="pairs per step", title_justify="left")
    for col in ("step", "pairs", *hows, "ref only", "cand only"):
        summary.add_column(col, justify="right")
    for s in steps:
        by_how = Counter(p.how for p in alignment.pairs if p.ref.step == s)
        summary.add_row(str(s), str(sum(by_how.values())), *(str(by_how[h]) for h in hows),
                        str(sum(r.step == s for r in alignment.ref_only)),
                        str(sum(c.step == s for c in alignment.cand_only)))
    yield summary
    pairs = [p for p in alignment.pairs if p.ref.step == step]
    evidence = any(getattr(p, "evidence", "") for p in pairs)
    table = Table(title=f"step {step}: {len(pairs)} pairs", title_justify="left")
    for col in ("reference", "candidate", "how", "canonical", "transforms", "confidence"):
        table.add_column(col, overflow="fold")
    if evidence:
        table.add_column("evidence", overflow="fold")
    for p in pairs:
        row = [text(p.ref.name), text(p.cand.name), p.how, p.canonical or "-", _transforms(p),
               _confidence(p)]  # names from the dumps: text, never markup
        table.add_row(*row, *([text(getattr(p, "evidence", "") or "-")] if evidence else []))
    yield table
    for side, records in (("reference", alignment.ref_only), ("candidate", alignment.cand_only)):
        names = [r.name for r in records if r.step == step]
        if names:
            yield Text(f"{side} only, step {step} ({len(names)}): {', '.join(names)}")


def _json(alignment: Any, reference: str, candidate: str) -> dict[str, Any]:
    def record(r: Any) -> dict[str, Any]:
        return {"step": r.step, "name": r.name, "call": r.call, "shape": list(r.shape)}

    tables = getattr(alignment, "tables", None)
    return {
        "reference": reference, "candidate": candidate,
        "tables": list(tables) if tables else None,
        "ignored": getattr(alignment, "ignored", 0),
        "pairs": [{"step": p.ref.step, "ref": p.ref.name, "cand": p.cand.name,
                   "call": p.ref.call, "how": p.how, "canonical": p.canonical,
                   "ref_transform": p.ref_transform, "cand_transform": p.cand_transform,
                   "confidence": getattr(p, "confidence", None),
                   "evidence": getattr(p, "evidence", None) or None}
                  for p in alignment.pairs],
        "ref_only": [record(r) for r in alignment.ref_only],
        "cand_only": [record(c) for c in alignment.cand_only],
    }


@dataclass
class AlignReport(Report):
    """An alignment (``align.pairing.align``): ``step``'s pairs in the terminal, of
    ``steps``; the JSON names the two dumps, ``reference`` and ``candidate``."""

    alignment: Any
    step: int
    steps: list[int]
    reference: str
    candidate: str
    kind = "align"

    def render(self, console: Console, options: ConsoleOptions) -> RenderResult:
        yield from _render(self.alignment, self.step, self.steps)

    def to_json(self) -> dict[str, Any]:
        return _json(self.alignment, self.reference, self.candidate)
