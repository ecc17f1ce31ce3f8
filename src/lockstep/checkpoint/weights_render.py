"""The ``weights`` report: a LoadCheck (does a loaded model hold its checkpoint's weights, and
where are they placed?) in the terminal (rich) and as JSON."""

from __future__ import annotations

from collections import Counter
from typing import TYPE_CHECKING, Any

from ..report.base import SubjectReport
from ..textfmt import short
from .shards import shard_of

if TYPE_CHECKING:
    from rich.console import Console, ConsoleOptions, RenderResult

    from .weights import LoadCheck

__all__ = ["render_check", "LoadCheckView"]


def render_check(check: LoadCheck, *, rows: int = 40) -> list[Any]:
    """Renderables for a LoadCheck: verdict, tensors not equal, layers, placement."""
    from rich.table import Table
    from rich.text import Text

    from ..display import safe, text

    problems = check.problems
    placement = check.placement
    if check and placement:
        held = Counter(f"shard {f[0]} of {f[1]}" for f in map(shard_of, (
            p.transform for p in check.params)) if f is not None)
        shards = ", ".join(f"{n} as {which}" for which, n in held.most_common())
        verdict = Text(f"PASS  all {len(check.params)} tensors equal to the checkpoint"
                       + (f" ({shards}: one tensor-parallel rank's)" if shards else "")
                       + f"; every module on {placement.device}, {placement.dtype}",
                       style="bold green")
    else:
        words = [f"{len(problems)} of {len(check.params)} tensors not equal"] if problems else []
        if check.not_loaded:
            words.append("not loaded: " + safe(", ".join(check.not_loaded)))
        if not placement:
            words.append(f"{len(placement.outliers)} modules placed apart from the rest")
        verdict = Text("FAIL  " + "; ".join(words), style="bold red")
    out: list[Any] = [verdict, text(f"checkpoint: {check.checkpoint} ({check.kind})")]
    if problems:
        table = Table(title="tensors not equal to the checkpoint"
                      + (f" (first {rows} of {len(problems)})" if len(problems) > rows else ""))
        table.add_column("tensor", overflow="fold")
        table.add_column("dtype (ckpt)")
        table.add_column("rel L2")
        table.add_column("status", min_width=20)
        for p in problems[:rows]:
            table.add_row(text(p.name), text(f"{p.dtype or '-'} ({p.checkpoint_dtype or '-'}"
                                             + (f", {p.transform})" if p.transform else ")")),
                          short(p.rel_l2), text(p.status + (f": {p.note}" if p.note else "")),
                          style="red" if p.status != "different" else "yellow")
        out.append(table)
    layers = Table(title="by layer")
    for col in ("layer", "tensors", "equal", "other", "verdict"):
        layers.add_column(col, justify="right" if col in ("tensors", "equal") else "left")
    loaded = [s for s in check.layers if s.verdict == "loaded"]
    for s in check.layers:
        if s.verdict != "loaded":
            other = ", ".join(f"{n} {k}" for k, n in s.counts.items() if k != "equal")
            layers.add_row(text(s.layer), str(s.tensors), str(s.counts.get("equal", 0)), other,
                           s.verdict, style="red")
    if loaded:  # one row for all the layers that are fine
        n = sum(s.tensors for s in loaded)
        layers.add_row(f"{'all' if len(loaded) == len(check.layers) else 'the other'} "
                       f"{len(loaded)} layers and modules", str(n), str(n), "-", "loaded")
    out.append(layers)
    groups = Table(title=f"placement (majority: {placement.device}, {placement.dtype})")
    for col in ("device", "dtype", "modules", "parameters"):
        groups.add_column(col, justify="right" if col in ("modules", "parameters") else "left")
    for g in placement.groups():
        apart = g["device"] != placement.device or g["dtype"] != placement.dtype
        groups.add_row(g["device"], g["dtype"], str(g["modules"]), f"{g['params']:,}",
                       style="red" if apart else None)
    out.append(groups)
    if placement.outliers:
        table = Table(title="modules placed apart from the rest")
        for col in ("module", "device", "dtype", "parameters", "why"):
            table.add_column(col)
        for m in placement.outliers[:rows]:
            table.add_row(text(m.name or "(root)"), m.device, m.dtype, f"{m.params:,}", m.outlier,
                          style="red")
        out.append(table)
    return out


class LoadCheckView(SubjectReport):
    """The weights report of a LoadCheck; ``rows`` bounds the tables of tensors and modules
    (all in JSON)."""

    kind = "weights"

    def render(self, console: Console, options: ConsoleOptions) -> RenderResult:
        yield from render_check(self.subject, rows=self.rows)
