"""The ``inspect --against`` report: an AgainstReport in the terminal (rich) and as JSON."""

from __future__ import annotations

from collections import Counter
from typing import TYPE_CHECKING, Any

from ..report.base import SubjectReport
from ..textfmt import short
from .against import AgainstReport, PairResult

if TYPE_CHECKING:
    from rich.console import Console, ConsoleOptions, RenderResult

__all__ = ["render_against", "AgainstView", "TRANSFORM_WORDS"]

#: what each layout transform means, for people
TRANSFORM_WORDS = {
    "transpose": "transposed",
    "reshape": "reshaped",
    "rope_unpermute": "Q/K rows in llama.cpp/Meta order (RoPE pairs interleaved), undone",
    "rope_permute": "Q/K rows in transformers order where the other has llama.cpp/Meta order",
}


def _shape(shape: tuple[int, ...] | None) -> str:
    return "-" if shape is None else "x".join(map(str, shape)) or "scalar"


def _transform(p: PairResult) -> str:
    words = p.transform + (f" (head_dim {p.head_dim})" if p.head_dim else "")
    return ", ".join(filter(None, (words, "tied" if p.tied else "")))


def render_against(report: AgainstReport, *, rows: int = 40) -> list[Any]:
    """Renderables: a verdict line, the table by dtype, the layouts undone, the problems."""
    from rich.table import Table
    from rich.text import Text

    from ..display import text

    counts = Counter(p.status for p in report.pairs)
    bad = [p for p in report.pairs if not p.ok]
    verdict = ("PASS  every tensor pairs, errors within what the dtypes explain" if report
               else f"FAIL  {len(bad)} of {len(report.pairs)} tensors do not pair or differ "
                    "beyond what the dtypes explain")
    out: list[Any] = [
        Text(verdict, style="bold green" if report else "bold red"),
        text(f"A: {report.path_a} ({report.kind_a})"),  # (one line each: a name from the
        text(f"B: {report.path_b} ({report.kind_b})"),  # user prints with its escapes)
        Text(f"{len(report.pairs)} tensors: " + ", ".join(
            f"{counts[s]} {s}" for s in ("ok", "mismatch", "shape", "unreadable", "missing",
                                         "extra")
            if counts[s]) + "  (missing: only in B; extra: only in A)"),
    ]
    h = report.heads
    if h.n_head or h.n_kv or h.head_dim:
        out.append(Text(f"heads: {h.n_head or '?'} query, {h.n_kv or '?'} key/value, "
                        f"head_dim {h.head_dim or '?'}"))
    table = Table(title="by storage type (relative L2 error after undoing layouts)")
    for col in ("A dtype", "B dtype", "tensors", "failed", "max rel L2", "max abs",
                "budget", "layouts"):
        table.add_column(col, justify="right" if col in ("tensors", "failed") else "left")
    for r in report.by_dtype():
        table.add_row(text(r["dtype_a"]), text(r["dtype_b"]), str(r["tensors"]), str(r["failed"]),
                      short(r["max_rel_l2"]), short(r["max_abs"]), short(r["budget"]),
                      ", ".join(f"{k} {v}" for k, v in r["transforms"].items()),
                      style="red" if r["failed"] else None)
    out.append(table)
    undone = Counter((p.transform, p.head_dim) for p in report.pairs if p.transform and p.ok)
    for (name, head_dim), n in undone.items():
        words = " + ".join(TRANSFORM_WORDS.get(part, part) for part in name.split("+"))
        out.append(Text(f"layout: {n} tensors {words}"
                        + (f" (head_dim {head_dim})" if head_dim else "")))
    for p in report.pairs:
        if p.tied:
            out.append(text(f"tied lm_head: {p.name_a} ~ {p.name_b} (the side without an "
                            "lm_head uses its token embedding)"))
    if bad:
        problems = Table(title="tensors that do not pair or differ"
                         + (f" (first {rows} of {len(bad)}; all in --json)"
                            if len(bad) > rows else ""))
        problems.add_column("tensor", overflow="fold")
        for col in ("status", "A", "B", "layout", "rel L2", "budget"):
            problems.add_column(col)
        for p in bad[:rows]:
            problems.add_row(text(p.key), text(p.status + (f": {p.note}" if p.note else "")),
                             text(f"{p.dtype_a} {_shape(p.shape_a)}") if p.name_a else "-",
                             text(f"{p.dtype_b} {_shape(p.shape_b)}") if p.name_b else "-",
                             _transform(p) or "-", short(p.rel_l2), short(p.budget),
                             style="red")
        out.append(problems)
    return out


class AgainstView(SubjectReport):
    """The report of checkpoint A against checkpoint B (an AgainstReport)."""

    kind = "against"

    def render(self, console: Console, options: ConsoleOptions) -> RenderResult:
        yield from render_against(self.subject, rows=self.rows)
