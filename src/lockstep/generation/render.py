"""The generation report: a GenerationResult in the terminal (rich) and as JSON."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.console import Console, ConsoleOptions, Group, RenderResult
from rich.panel import Panel
from rich.table import Table
from rich.text import Text

from ..report.base import Report
from ..report.terminal import ComparisonReport, fmt
from .json_out import generation_dict
from .metrics import StepCompare, StepSummary
from .result import GenerationResult, PromptResult, Side

__all__ = ["GenerationReport"]

_KIND_STYLE = {"same": "green", "near_tie": "yellow", "split": "bold red"}
_KIND_TEXT = {"same": "same", "near_tie": "near-tie", "split": "split"}
_SHORT = {"same": "same", "near_tie": "tie", "split": "split"}


def _side(label: str, side: Side) -> Text:
    meta = side.meta
    what = ", ".join(Path(str(meta[k])).name if k == "model" else str(meta[k])
                     for k in ("engine", "model", "dtype", "quantization") if meta.get(k))
    return Text.assemble((f"{label}: ", "bold"), side.spec, f"  ({what})" if what else "")


def _clip(text: str, width: int) -> str:
    text = text.replace("\n", "\\n")
    return text if len(text) <= width else text[: width - 1] + "…"


def _token(p: PromptResult, token: int) -> str:
    piece = p.pieces.get(token)
    return f"{token} {piece!r}" if piece is not None else str(token)


def _tokens(n: int) -> str:
    return f"{n} token" if n == 1 else f"{n} tokens"


def _free_cell(p: PromptResult) -> Text:
    split = p.free.split
    if split is None:
        return Text("none", style="green")
    return Text(f"{split.step} {_SHORT[split.kind]}", style=_KIND_STYLE[split.kind])


def _garbage_cell(p: PromptResult) -> Text:
    flags = p.garbage
    if flags:
        return Text(", ".join(f.kind for f in flags), style="bold red")
    shared = [f.kind for f in p.candidate_flags]
    return Text(f"({', '.join(shared)}: reference too)" if shared else "", style="dim")


def _summary_table(result: GenerationResult, width: int) -> Table:
    table = Table(title="per prompt: the free-running split (tie: a near-tie); teacher-forced "
                        "(the candidate fed the reference's tokens): same top token, near-ties, "
                        "real splits, KL", title_justify="left")
    prompt_width = max(10, min(40, width - 78))  # the other columns take about 78 cells
    for col in ("#", "prompt", "free", "same", "ties", "splits", "KL mean", "KL max",
                "garbage"):
        table.add_column(col, justify="left" if col in ("prompt", "free", "garbage")
                         else "right", overflow="fold" if col == "garbage" else "ellipsis",
                         no_wrap=col != "garbage",
                         max_width=prompt_width if col == "prompt" else None)
    for p in result.prompts:
        s = p.summary
        table.add_row(str(p.index + 1), _clip(p.prompt.label, prompt_width), _free_cell(p),
                      f"{s.same_top}/{s.steps}", str(s.near_ties),
                      Text(str(s.splits), style="bold red" if s.splits else ""),
                      Text(fmt(s.kl.mean), style="bold red" if p.kl_step is not None else ""),
                      fmt(s.kl.max), _garbage_cell(p))
    return table


def _steps_table(p: PromptResult, rows: int) -> Table:
    parted = [s for s in p.steps if s.kind != "same"][:rows]
    table = Table(title=f"teacher-forced steps where the tokens differ ({len(parted)} shown)",
                  title_justify="left")
    for col in ("step", "reference", "candidate", "ref gap", "cand gap", "KL", "in top-k",
                "kind"):
        table.add_column(col, justify="right" if col in ("step", "ref gap", "cand gap", "KL")
                         else "left")
    for s in parted:
        table.add_row(str(s.step), _token(p, s.ref_token), _token(p, s.cand_token),
                      fmt(s.ref_gap), fmt(s.cand_gap), fmt(s.kl),
                      "both" if s.close else "no",
                      Text(_KIND_TEXT[s.kind], style=_KIND_STYLE[s.kind]))
    return table


def _split_line(p: PromptResult, s: StepCompare) -> Text:
    return Text.assemble(
        f"free-running: {_tokens(p.free.shared)} alike, then at step {s.step} reference ",
        (_token(p, s.ref_token), "bold"), " vs candidate ", (_token(p, s.cand_token), "bold"),
        f": the reference prefers its token by {fmt(s.ref_gap)} nats, the candidate its own "
        f"by {fmt(s.cand_gap)} (margins top-1/top-2 {fmt(s.ref_margin)} / "
        f"{fmt(s.cand_margin)}) → ", (_KIND_TEXT[s.kind], _KIND_STYLE[s.kind]))


def _prompt_detail(p: PromptResult, rows: int, limit: float) -> RenderResult:
    body: list[Any] = []
    if p.free.split is not None:
        body.append(_split_line(p, p.free.split))
    else:
        body.append(Text(f"free-running: all {_tokens(p.free.shared)} alike"))
    if p.free.ref_text is not None:
        body.append(Text.assemble(("reference  ", "bold"), repr(p.free.ref_text)))
        body.append(Text.assemble(("candidate  ", "bold"), repr(p.free.cand_text)))
    else:
        body.append(Text(f"reference  {list(p.free.ref_tokens)}\n"
                         f"candidate  {list(p.free.cand_tokens)}"))
    if p.kl_step is not None:
        body.append(Text(f"KL         mean {fmt(p.summary.kl.mean)} nats is over the limit "
                         f"({fmt(limit)}), first over it at step {p.kl_step}", style="bold red"))
    check = p.decode_check
    if check is not None and check.broken:
        body.append(Text(f"decode     step 1 differs from the candidate's own prefill of the "
                         f"same tokens by KL {fmt(check.kl)} nats (limit {fmt(check.limit)}): "
                         "a decode-only bug (KV cache, position or the token fed)",
                         style="bold red"))
    if p.summary.off_argmax:
        body.append(Text(f"sampling   at {p.summary.off_argmax} steps the candidate's token is "
                         "not the top of its own logits: check the logits-to-token step "
                         "(argmax axis, temperature, the token's type)", style="bold red"))
    for flag in p.garbage:
        body.append(Text(f"garbage    {flag}", style="bold red"))
    if any(s.kind != "same" for s in p.steps):
        body.append(_steps_table(p, rows))
    loc = p.localization
    if loc is not None and loc.comparison is None:
        body.append(Text(f"tensor comparison at step {loc.step} could not run: {loc.error}",
                         style="magenta"))
    elif loc is not None:
        body.append(Text(f"tensor comparison up to step {loc.step} (dumps in {loc.out}):",
                         style="bold"))
    title = f"prompt {p.index + 1}: {_clip(p.prompt.label, 60)!r}"
    yield Panel(Group(*body), title=title, title_align="left", expand=False)
    if loc is not None and loc.comparison is not None:
        yield ComparisonReport(loc.comparison, rows=rows)


def _overall(result: GenerationResult) -> Panel:
    s: StepSummary = result.summary
    bad = [p for p in result.prompts if not p.ok]
    garbage = [p for p in result.prompts if p.garbage]
    real = sum(p.split_step is not None for p in result.prompts)
    far = sum(p.kl_step is not None for p in result.prompts)
    cfg = result.settings
    if not bad:
        head = Text.assemble(("PASS", "bold green"), "  every split is a near-tie, KL stays "
                             "within its limit and no output looks like garbage")
    else:
        head = Text.assemble(("FAIL", "bold red"), f"  of {len(result.prompts)} prompts, {real} "
                             f"split for real, {far} have a mean KL over {fmt(cfg.max_kl)} "
                             f"nats, {len(garbage)} look like garbage")
    grid = Table.grid(padding=(0, 2))
    grid.add_column(style="bold")
    grid.add_column()
    same = f"{s.same_top}/{s.steps} steps ({s.same_top_rate:.2%})"
    if s.same_argmax != s.same_top:  # a token chosen off the logits' top (a sampler bug)
        same += (f" on the tokens chosen, {s.same_argmax}/{s.steps} on the logits' top tokens")
    grid.add_row("same top token" if s.same_argmax == s.same_top else "same token",
                 f"{same}; near-ties {s.near_ties} (within {fmt(cfg.near_tie)} nats), real "
                 f"splits {s.splits}")
    kl = s.kl
    grid.add_row("KL(ref || cand)", f"mean {fmt(kl.mean)}, median {fmt(kl.median)}, p99 "
                                    f"{fmt(kl.p99)}, max {fmt(kl.max)} nats"
                 + (f"; {kl.nonfinite} steps not finite" if kl.nonfinite else ""))
    grid.add_row(f"top-{cfg.top_k}", f"overlap {s.overlap:.3f}; {s.not_close} differing "
                                     f"steps with a token outside the other's top-{cfg.top_k}")
    if not math.isnan(s.dp_rms):
        grid.add_row("Δp", f"reference token's probability: mean {s.dp_mean:+.4f}, "
                           f"RMS {s.dp_rms:.4f}")
    t = result.timing
    grid.add_row("time", f"{t.total_s:.1f} s: engines decoding {t.engine_s:.1f} s, loading "
                         f"{t.load_s:.1f} s, localizing {t.localize_s:.1f} s, the rest "
                         f"{t.total_s - t.engine_s - t.load_s - t.localize_s:.1f} s")
    return Panel(Group(head, grid), title="lockstep generate", expand=False)


@dataclass
class GenerationReport(Report):
    """Renders a GenerationResult: both sides, the per-prompt table, the details of every
    prompt that split or produced garbage (with its tensor comparison), the overall verdict.

    ``rows`` bounds each detail table and the comparison's pair window. ``to_json()`` is
    ``generation_dict``; the HTML page draws every step (``whole=True``).
    """

    result: GenerationResult
    rows: int = 12
    kind = "generation"

    def to_json(self) -> dict[str, Any]:
        return generation_dict(self.result)

    def html_json(self) -> dict[str, Any]:
        return generation_dict(self.result, whole=True)

    def render(self, console: Console, options: ConsoleOptions) -> RenderResult:
        r = self.result
        yield _side("reference", r.reference)
        yield _side("candidate", r.candidate)
        cfg = r.settings
        yield Text(f"{len(r.prompts)} prompts, {cfg.max_new_tokens} greedy tokens each, top-k "
                   f"{cfg.top_k}, near-tie within {fmt(cfg.near_tie)} nats, mean KL limit "
                   f"{fmt(cfg.max_kl)} nats")
        yield _summary_table(r, options.max_width)
        for p in r.prompts:
            if not p.ok:
                yield from _prompt_detail(p, self.rows, cfg.max_kl)
        yield _overall(r)
