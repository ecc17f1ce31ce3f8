"""The comparison report: its terminal face (a rich renderable) and its JSON (``report_dict``),
from one Comparison."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence

from rich.console import Console, ConsoleOptions, Group, RenderResult
from rich.padding import Padding
from rich.panel import Panel
from rich.table import Table
from rich.text import Text

from ..align.kinds import Kind, kind_of
from ..align.tables import table_canonical
from ..compare.comparison import Comparison, DumpSummary
from ..compare.coverage import Gap
from ..compare.diagnosis import Diagnosis
from ..compare.pair_result import PairResult
from ..compare.statistics import CAN_SHOW, CANNOT_SHOW
from ..display import text as _text
from ..textfmt import fmt
from .base import Report
from .json_report import report_dict, statistics_sentence
from .pair_status import status

__all__ = ["ComparisonReport", "VERDICT_STYLE", "VERDICT_TEXT"]

VERDICT_STYLE = {"match": "bold green", "drift": "bold yellow", "diverged": "bold red",
                  "incomplete": "bold magenta"}
#: one sentence per verdict, as every face of the report says it
VERDICT_TEXT = {
    "match": "every paired tensor agrees within tolerance",
    "drift": "errors stay bounded and grow smoothly (precision or quantization noise); "
             "top-1 tokens agree",
    "diverged": "an error is introduced at one tensor, far above what it inherited",
    "incomplete": "what decides the verdict was not all compared: lockstep cannot tell",
}
#: drift that grew out of bounds: replay showed every op's own error within its precision
AMPLIFIED_TEXT = ("errors grow out of bounds with no jump, and replaying every op shows each "
                  "one's own error within its operands' precision: this input amplifies the "
                  "candidate's precision (not a bug)")
_STATUS_STYLE = {"match": "green", "drift": "yellow", "jump": "bold red",
                 "inherited": "red", "incomparable": "magenta", "statistics agree": "cyan"}



def _row(table: Table, *cells: Any, **options: Any) -> None:
    """A row whose text cells are data (names from a dump), never markup."""
    table.add_row(*(_text(c) if isinstance(c, str) else c for c in cells), **options)

def _side(label: str, s: DumpSummary) -> Text:
    meta = s.meta
    what = ", ".join(Path(str(meta[k])).name if k == "model" else str(meta[k])
                     for k in ("engine", "model", "dtype", "label") if meta.get(k))
    text = Text.assemble((f"{label}: ", "bold"), s.path, f"  ({what}) " if what else "  ",
                         f"{s.records} records, steps {_steps(s.steps)}")
    if not s.complete:
        text.append("  INCOMPLETE: the writer stopped before closing the dump",
                    style="bold magenta")
    if s.error:
        text.append(f"  the run raised {s.error}", style="magenta")
    return text


def _steps(steps: Iterable[int]) -> str:
    steps = list(steps)
    if not steps:
        return "none"
    return f"{steps[0]}" if len(steps) == 1 else f"{steps[0]}-{steps[-1]}"


def _name(p: PairResult) -> str:
    return p.ref_name if p.ref_name == p.cand_name else f"{p.ref_name} ~ {p.cand_name}"


def _divergence(p: PairResult) -> Table:
    grid = Table.grid(padding=(0, 2))
    grid.add_column(style="bold")
    grid.add_column()
    _row(grid, "step", str(p.step))
    _row(grid, "reference", p.ref_name or '"" (root)')
    _row(grid, "candidate", p.cand_name or '"" (root)')
    _row(grid, "shapes", f"{list(p.ref_shape)} {p.ref_dtype} vs {list(p.cand_shape)} "
                           f"{p.cand_dtype}")
    layout = [f"{side} {spec}" for side, spec in (("reference", p.ref_transform),
                                                  ("candidate", p.cand_transform)) if spec]
    if layout:
        _row(grid, "compared as", "; ".join(layout) + f" (paired by {p.how})")
    _row(grid, "error", f"relative L2 {fmt(p.error)} (tolerance {fmt(p.tol)}, "
                          f"noise allowance {fmt(p.noise)})")
    grow = "from zero" if math.isinf(p.growth) else f"{fmt(p.growth)}x"
    _row(grid, "introduced", f"inherited error {fmt(p.inherited)}, grew {grow} here")
    m = p.metrics
    if m is not None:
        _row(grid, "worst element", f"index {list(m.worst_index)}: reference "
                                      f"{fmt(m.worst_ref)}, candidate {fmt(m.worst_cand)}")
        _row(grid, "max / mean abs", f"{fmt(m.max_abs)} / {fmt(m.mean_abs)}, cosine "
                                       f"{m.cosine:.6f}")
        if m.ref_nan or m.cand_nan or m.ref_inf or m.cand_inf:
            _row(grid, "NaN / Inf", f"reference {m.ref_nan} / {m.ref_inf}, candidate "
                                      f"{m.cand_nan} / {m.cand_inf}")
        if m.topk is not None:
            _row(grid, "top-1", f"{m.topk.agree}/{m.topk.rows} positions agree "
                                  f"({m.topk.near_ties} near-ties)")
    if p.note:
        _row(grid, "note", p.note)
    return grid


def _gaps(gaps: Sequence[Gap], verdict: str) -> Group:
    """Why the verdict is incomplete: what went uncompared, the closest candidate records,
    and the mapping-file rules that would pair them."""
    head = ("not compared" if verdict == "incomplete" else
            "also not compared (the divergence wins)")
    body: list[Any] = [Text(head, style="bold underline")]
    for gap in gaps:
        body.append(Text.assemble(("- ", "bold magenta"), gap.reason))
        if gap.records:
            body.append(Text(f"    uncompared: {', '.join(gap.records)}"))
        for near in gap.closest:
            body.append(Text(f"    closest unpaired candidate record for {near.reference}: "
                             f"{near.candidate} {list(near.shape)}"))
        if gap.rule:
            body.append(Text("    a mapping-file rule that would pair them (--mapping FILE):"))
            body.append(Text("\n".join(f"      {line}" for line in gap.rule.splitlines()),
                             style="cyan"))
    return Group(*body)


def _diagnosis(d: Diagnosis) -> Panel:
    """What kind of problem the divergence is: the title, the evidence, what to check."""
    body: list[Any] = [Text.assemble((d.kind.upper(), "bold magenta"), "  ", (d.title, "bold"))]
    for heading, lines, marks in (("evidence", d.evidence, ["-"] * len(d.evidence)),
                                  ("what to check", d.checks,
                                   [f"{i}." for i in range(1, len(d.checks) + 1)])):
        if lines:
            grid = Table.grid(padding=(0, 1))  # a hanging indent for wrapped lines
            grid.add_column(justify="right")
            grid.add_column()
            for mark, line in zip(marks, lines):
                _row(grid, mark, line)
            body += [Text(""), Text(heading, style="bold underline"), grid]
    return Panel(Group(*body), title="diagnosis", expand=False)


def _replay(replay: Any) -> Panel:
    """The dual test: each replayed op's error, introduced here or inherited."""
    body: list[Any] = []
    amplified = replay.amplified
    if amplified is not None:  # a divergence with no jump, audited op by op
        head = ("drift: the candidate's precision, amplified by this input"
                if amplified.explained else "not shown to be precision")
        body.append(Text.assemble((head, "bold"), f" ({amplified.why}; "
                                  f"{amplified.seconds:.1f} s)"))
    if replay.precision:
        body.append(Text(f"the first op's error is what {replay.precision} operands give: the "
                         f"candidate was compared as computing in {replay.precision} "
                         "(measured by replay, not declared)", style="bold"))
    other_way = any(op.reverse is not None for op in replay.ops)
    skipped = []
    for op in replay.ops:  # two lines each: a table of 7 columns is unreadable at 80
        if op.introduced is None:  # said below: a long reason
            skipped.append(op)
            continue
        where = op.where or ""
        if op.explained_by:
            where += f", {op.explained_by} rounding"
        figures = [f"error {fmt(op.total)}", f"introduced here {fmt(op.introduced)}",
                   f"its input's error {fmt(op.inherited)}"]
        figures += [f"{short} rounding {fmt(op.rounding[d])}"
                    for d, short in (("bfloat16", "bf16"), ("float16", "fp16"))
                    if d in op.rounding]
        if op.reverse is not None:
            figures.append(f"the candidate's op on the reference's input {fmt(op.reverse)}")
        body.append(Text.assemble(f"step {op.step}  ", (op.reference, "bold"),
                                  f"  {where}" if where else ""))
        body.append(Padding(Text("; ".join(figures)), (0, 0, 0, 4)))
    for op in skipped:
        body.append(Text(f"not replayed: {op.reference} (step {op.step}, error "
                         f"{fmt(op.total)}): {op.note}"))
    body.append(Text("the reference's ops re-run on the candidate's recorded inputs"
                     + (", and the candidate's ops on the reference's" if other_way else "")
                     + f" ({replay.seconds:.2f} s)", style="dim"))
    why_not: dict[str, list[str]] = {}  # each reason, with the ops it kept from running
    for op in replay.ops:
        if op.reverse is None and op.reverse_note:
            why_not.setdefault(op.reverse_note, []).append(op.reference)
    if why_not:  # the other way was tried and refused: say why, not just leave it out
        reasons = [f"{', '.join(dict.fromkeys(ops))}: {note}"
                   for note, ops in list(why_not.items())[:3]]
        body.append(Text(f"{'some' if other_way else 'none'} of the candidate's ops run on the "
                         f"reference's inputs; {'; '.join(reasons)}", style="dim"))
    return Panel(Group(*body), title="replay (the dual test)", expand=False)


def _error_path(c: Comparison) -> Table:
    """Where the error enters, how large it gets, and the final hidden state's cosine."""
    grid = Table.grid(padding=(0, 2))
    grid.add_column(style="bold")
    grid.add_column()
    measured = [p for p in c.results if not math.isnan(p.error)]
    entry = next((p for p in measured if p.over), None)
    if entry is not None:
        _row(grid, "error enters", f"step {entry.step}, {_name(entry)}: relative L2 "
                                     f"{fmt(entry.error)} (tolerance {fmt(entry.tol)})")
    worst = max(measured, key=lambda p: p.error, default=None)
    if worst is not None:
        _row(grid, "largest error", f"step {worst.step}, {_name(worst)}: {fmt(worst.error)}")
    finals = [p for p in measured if p.metrics is not None and Kind.FINAL_NORM in (
              kind_of(p.canonical), kind_of(table_canonical(p.ref_name)))]
    broken = [p for p in finals if p.metrics is not None and math.isnan(p.metrics.cosine)]
    if broken:
        m = broken[0].metrics
        assert m is not None
        _row(grid, "final hidden", f"not finite from step {broken[0].step}: reference "
                                     f"{m.ref_nan + m.ref_inf}, candidate {m.cand_nan + m.cand_inf}"
                                     f" NaN/Inf of {m.numel} (no cosine)")
    elif finals:
        low = min(finals, key=lambda p: p.metrics.cosine if p.metrics else 1.0)
        assert low.metrics is not None
        _row(grid, "final hidden", f"cosine at least {low.metrics.cosine:.5f} over "
                                     f"{len(finals)} steps")
    return grid


def _verdict_line(c: Comparison) -> Text:
    """The verdict; agreement measured from statistics alone is never called a match."""
    amplified = getattr(c.replay, "amplified", None)
    if c.verdict == "drift" and amplified is not None and amplified.explained:
        return Text.assemble(("DRIFT", VERDICT_STYLE["drift"]), "  ", AMPLIFIED_TEXT)
    if c.evidence == "data" or c.verdict not in ("match", "drift"):
        return Text.assemble((c.verdict.upper(), VERDICT_STYLE[c.verdict]), "  ",
                             VERDICT_TEXT[c.verdict])
    return Text.assemble(("STATISTICS AGREE", "bold cyan"), "  ", statistics_sentence(c))


def _statistics_limits(c: Comparison) -> Group:
    """What the statistics of a stats-only capture can and cannot show."""
    body: list[Any] = [Text(f"{c.by_statistics} pairs were compared by their statistics "
                            "alone (min, max, mean, std, abs_max, NaN/Inf/zero counts)",
                            style="bold")]
    for head, lines in (("statistics can show", CAN_SHOW),
                        ("statistics cannot show", CANNOT_SHOW)):
        body.append(Text(head, style="underline"))
        body += [Text(f"- {line}") for line in lines]
    return Group(Text(""), *body)


@dataclass
class ComparisonReport(Report):
    """Renders a Comparison: sides, verdict, first divergence, the pairs, what is unpaired;
    ``to_json()`` is the JSON report (``report_dict``).

    ``rows`` limits the pair table: 0 shows every pair; otherwise the pairs around the first
    divergence (or the largest errors) and a per-step summary.
    """

    comparison: Comparison
    rows: int = 40
    kind = "comparison"

    def to_json(self) -> dict[str, Any]:
        return report_dict(self.comparison)

    def render(self, console: Console, options: ConsoleOptions) -> RenderResult:
        c = self.comparison
        yield _side("reference", c.reference)
        yield _side("candidate", c.candidate)
        body: list[Any] = [_verdict_line(c)]
        if c.evidence != "data":
            body.append(_statistics_limits(c))
        if c.verdict != "match":
            body.append(_error_path(c))
        if c.step_match is not None and c.step_match.noteworthy:
            body += [Text(""), Text(c.step_match.describe())]
        if c.ranks is not None:  # multi-rank sides: how their ranks were merged
            body += [Text(""), *(Text(line) for line in c.ranks.lines())]
        if c.chunks is not None:  # prefills fed in chunks: how their steps were joined
            body += [Text(""), *(Text(line) for line in c.chunks.lines())]
        if c.precision is not None:  # a declared precision the first layer did not show
            body += [Text(""), Text(f"precision: {c.precision.sentence()}")]
        if c.coverage is not None and c.coverage.gaps:
            body += [Text(""), _gaps(c.coverage.gaps, c.verdict)]
        if c.first_divergence is not None:
            body += [Text(""), Text("first divergence", style="bold underline"),
                     _divergence(c.first_divergence)]
        yield Panel(Group(*body), title="lockstep compare", expand=False)
        if c.diagnosis is not None:
            yield _diagnosis(c.diagnosis)
        if c.replay is not None and c.replay.ops:
            yield _replay(c.replay)
        yield self._steps_table()
        yield self._pairs_table()
        yield from self._unpaired()

    def _steps_table(self) -> Table:
        c = self.comparison
        table = Table(title="per step", title_justify="left")
        for col in ("step", "pairs", "over tol", "max error", "at", "top-1"):
            table.add_column(col, justify="right" if col not in ("at",) else "left")
        for step in c.steps:
            pairs = [p for p in c.results if p.step == step and not math.isnan(p.error)]
            if not pairs:
                continue
            worst = max(pairs, key=lambda p: p.error)
            top = [p.metrics.topk for p in pairs if p.metrics and p.metrics.topk]
            top1 = (f"{sum(t.agree for t in top)}/{sum(t.rows for t in top)}"
                    if top else "")
            _row(table, str(step), str(len(pairs)), str(sum(p.over for p in pairs)),
                          fmt(worst.error), _name(worst), top1)
        return table

    def _selected(self) -> list[PairResult]:
        results = list(self.comparison.results)
        if not self.rows or len(results) <= self.rows:
            return results
        first = self.comparison.first_divergence
        if first is not None:
            at = results.index(first)
            lo = max(0, at - self.rows // 2)
            return results[lo:lo + self.rows]
        keep = set(sorted(range(len(results)), key=lambda i: -results[i].error
                          if not math.isnan(results[i].error) else 0)[: self.rows])
        return [p for i, p in enumerate(results) if i in keep]

    def _pairs_table(self) -> Table:
        c = self.comparison
        shown = self._selected()
        title = "pairs in capture order"
        if len(shown) < len(c.results):
            title += f" ({len(shown)} of {len(c.results)}; --all shows every pair)"
        table = Table(title=title, title_justify="left")
        for col in ("step", "name", "shape", "rel err", "max abs", "cosine", "status"):
            table.add_column(col, justify="left" if col in ("name", "shape", "status")
                             else "right", overflow="fold")
        for p in shown:
            st = status(p)
            m = p.metrics
            style = "reverse bold red" if p is c.first_divergence else None
            _row(table, str(p.step), _name(p), "x".join(map(str, p.ref_shape)), fmt(p.error),
                          fmt(m.max_abs) if m else "", f"{m.cosine:.5f}" if m else "",
                          Text(st if not p.note else f"{st}: {p.note}",
                               style=_STATUS_STYLE[st]), style=style)
        return table

    def _unpaired(self) -> RenderResult:
        c = self.comparison
        for label, records in (("reference only", c.ref_only), ("candidate only", c.cand_only)):
            if records:
                names = ", ".join(f"{r.name}@{r.step}" for r in records[:8])
                more = f" and {len(records) - 8} more" if len(records) > 8 else ""
                yield Text(f"{label} ({len(records)} unpaired): {names}{more}", style="magenta")
