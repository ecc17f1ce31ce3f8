"""The ``bench`` reports: two engines side by side (``BenchResult``) and one op of each
(``OpBench``), in the terminal (rich) and as JSON."""

from __future__ import annotations

from typing import Any

from rich.console import Console, ConsoleOptions, RenderResult
from rich.table import Table
from rich.text import Text

from ..report.base import SubjectReport
from .op import op_lines
from .stats import NOISY_WHY

__all__ = ["BenchReport", "OpBenchReport", "render"]


def _num(x: float) -> str:
    return f"{x:.3g}" if abs(x) < 100 else f"{x:.0f}"


def _mib(n: int | None) -> str:
    return "-" if n is None else f"{n / 2**20:.0f} MiB"


def _forks(settings: dict[str, Any]) -> str:
    forks = settings.get("forks", 1)
    return (f", in {forks} forks (fresh processes, one after the other, each warmed up; "
            "every interval resampled over them)") if forks > 1 else ""


def render(result: Any) -> list[Any]:
    """The terminal face: the figures table, memory, the module breakdowns."""
    out: list[Any] = []
    s = result.settings
    out.append(Text(f"lockstep bench  reference {result.reference}  candidate "
                    f"{result.candidate}\n{s['iters']} rounds after {s['warmup']} warm-up, "
                    f"interleaved{_forks(s)}; decode: {s['max_new_tokens']} tokens after a "
                    f"{s['prompt_tokens']}-token prompt; median [p10-p90] (95% interval)"))
    table = Table(show_lines=False)
    for col in ("figure", "reference", "candidate", "cand/ref"):
        table.add_column(col, justify="left" if col == "figure" else "right",
                         no_wrap=col == "figure")
    for f in result.figures:
        cells = []
        for side in (f.reference, f.candidate):
            cells.append(f"{_num(side.median)} {f.unit} [{_num(side.p10)}-{_num(side.p90)}] "
                         f"({_num(side.low)}-{_num(side.high)}){side.flags}")
        r = f.ratio
        better = (r.high < 1) if f.lower_is_better else (r.low > 1)
        worse = (r.low > 1) if f.lower_is_better else (r.high < 1)
        mark = " faster" if better else (" slower" if worse else "")
        table.add_row(f.name, *cells, f"{r.value:.2f} ({r.low:.2f}-{r.high:.2f}){mark}")
    out.append(table)
    for name, why in result.skipped.items():
        out.append(Text(f"not measured: {name} ({why})"))
    if result.noisy:
        out.append(Text(f"NOISY: some figures {NOISY_WHY}", style="bold yellow"))
    mem = result.memory
    if mem:
        out.append(Text("peak memory (each engine's own process): " + ", ".join(
            f"{side} RSS {_mib(m.get('rss_bytes'))}"
            + (f", CUDA {_mib(m['cuda_max_allocated_bytes'])}"
               if m.get("cuda_max_allocated_bytes") is not None else "")
            for side, m in mem.items())))
    for side, m in result.modules.items():
        out.extend(_modules(side, m))
    return out


def _modules(side: str, m: dict[str, Any]) -> list[Any]:
    if not m.get("available"):
        return [Text(f"time per module, {side}: not available ({m.get('why')})")]
    t = Table(title=f"time per module kind, {side} (ms per prefill + "
                    f"{m['steps'] - 1} decode steps, the median run, {m['clock']})")
    t.add_column("kind")
    t.add_column("ms", justify="right")
    t.add_column("share", justify="right")
    hooked = m["hooked_ms"] or 1.0
    for kind, ms in m["by_kind"].items():
        t.add_row(kind, f"{ms:.2f}", f"{100 * ms / hooked:.1f}%")
    t.add_row("outside modules", f"{m['outside_modules_ms']:.2f}",
              f"{100 * m['outside_modules_ms'] / hooked:.1f}%")
    t.add_row("total (with hooks)", f"{m['hooked_ms']:.2f}", "100%")
    classes = ", ".join(f"{k} {v:.2f}" for k, v in list(m["by_class"].items())[:8])
    over = m["overhead_ms"]
    return [t, Text(f"by class (ms): {classes}"),
            Text(f"without hooks the same run takes {m['plain_ms']:.2f} ms: the timing's own "
                 f"overhead is {over:.2f} ms ({100 * over / max(m['plain_ms'], 1e-9):.1f}%); "
                 f"the rows sum to {m['in_modules_ms'] + m['outside_modules_ms']:.2f} ms")]


class BenchReport(SubjectReport):
    """Two engines side by side (a BenchResult): the figures, memory, the time per module."""

    kind = "bench"

    def render(self, console: Console, options: ConsoleOptions) -> RenderResult:
        yield from render(self.subject)


class OpBenchReport(SubjectReport):
    """One op of each implementation on the inputs its dump recorded (``bench --op``: an
    OpBench); no HTML page draws it."""

    kind = "bench_op"

    def render(self, console: Console, options: ConsoleOptions) -> RenderResult:
        for line in op_lines(self.subject):
            yield Text(line)
