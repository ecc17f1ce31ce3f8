"""``lockstep bench``: time to first token, tokens/s, peak memory and time per module of two
engines side by side, with confidence intervals."""

from __future__ import annotations

import argparse
from typing import Any

from ..engines.registry import kinds_with, spec_help
from .options import add_report_files, engine_options, int_list, write_reports

__all__ = ["register", "run"]




def register(sub: Any) -> None:
    b = sub.add_parser(
        "bench", help="time two engines side by side: TTFT, tokens/s, memory, per module",
        description="Each engine runs in its own process; timings are taken inside it, "
                    "interleaved between the two. Medians, p10/p90 and 95%% bootstrap "
                    "intervals; the candidate/reference ratio with its interval. Exit 0.")
    b.add_argument("reference", help=spec_help() + " (with --op: the reference's dump, REF.lsd)")
    b.add_argument("candidate", help="engine spec, as for the reference (with --op: CAND.lsd)")
    src = b.add_mutually_exclusive_group()
    src.add_argument("--prompt", metavar="TEXT", help="prompt text (tokenized by the reference)")
    src.add_argument("--prompts", metavar="FILE", help="prompts file (.txt or JSONL, as for "
                                                       "generate), their tokens one after another")
    src.add_argument("--tokens", type=int_list, metavar="IDS", help="prompt token ids, e.g. 1,2,3")
    b.add_argument("--lengths", type=int_list, default=[32, 128, 512], metavar="N,N,...",
                   help="prompt lengths for time to first token (default 32,128,512; the "
                        "prompt's tokens are repeated to each length)")
    b.add_argument("--max-new-tokens", type=int, default=32, metavar="N",
                   help="greedy decode steps per decode sample (default 32)")
    b.add_argument("--warmup", type=int, default=10, help="rounds not kept (default 10)")
    b.add_argument("--iters", type=int, default=100, help="rounds measured (default 100)")
    b.add_argument("--modules", action="store_true",
                   help="also time each module kind and class per layer (torch engines)")
    b.add_argument("--plot", metavar="FILE.svg", help="draw the per-module times (--modules)")
    b.add_argument("--ref-dtype", default="float32",
                   help=f"dtype of an {kinds_with('dtype')} reference")
    b.add_argument("--cand-dtype", default="float32",
                   help=f"dtype of an {kinds_with('dtype')} candidate")
    b.add_argument("--ref-opt", action="append", default=[], metavar="KEY=VALUE")
    b.add_argument("--cand-opt", action="append", default=[], metavar="KEY=VALUE")
    add_report_files(b, "also write everything as JSON")
    from .bench_op import add_op_arguments

    add_op_arguments(b)
    b.set_defaults(handler=run)


def _num(x: float) -> str:
    return f"{x:.3g}" if abs(x) < 100 else f"{x:.0f}"


def _mib(n: int | None) -> str:
    return "-" if n is None else f"{n / 2**20:.0f} MiB"


def render(result: Any) -> list[Any]:
    """The terminal face: the figures table, memory, the module breakdowns."""
    from rich.table import Table
    from rich.text import Text

    out: list[Any] = []
    s = result.settings
    out.append(Text(f"lockstep bench  reference {result.reference}  candidate "
                    f"{result.candidate}\n{s['iters']} rounds after {s['warmup']} warm-up, "
                    f"interleaved; decode: {s['max_new_tokens']} tokens after a "
                    f"{s['prompt_tokens']}-token prompt; median [p10-p90] (95% interval)"))
    table = Table(show_lines=False)
    for col in ("figure", "reference", "candidate", "cand/ref"):
        table.add_column(col, justify="left" if col == "figure" else "right",
                         no_wrap=col == "figure")
    for f in result.figures:
        cells = []
        for side in (f.reference, f.candidate):
            cells.append(f"{_num(side.median)} {f.unit} [{_num(side.p10)}-{_num(side.p90)}] "
                         f"({_num(side.low)}-{_num(side.high)})" + (" noisy" if side.noisy
                                                                    else ""))
        r = f.ratio
        better = (r.high < 1) if f.lower_is_better else (r.low > 1)
        worse = (r.low > 1) if f.lower_is_better else (r.high < 1)
        mark = " faster" if better else (" slower" if worse else "")
        table.add_row(f.name, *cells, f"{r.value:.2f} ({r.low:.2f}-{r.high:.2f}){mark}")
    out.append(table)
    for name, why in result.skipped.items():
        out.append(Text(f"not measured: {name} ({why})"))
    if result.noisy:
        out.append(Text("NOISY: some figures vary by more than 10% (coefficient of variation); "
                        "the machine is busy or throttling: read the ratio's interval, or "
                        "rerun on a quiet machine", style="bold yellow"))
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
    from rich.table import Table
    from rich.text import Text

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


def run(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

    from ..bench.run import run_bench
    from ..errors import UsageError

    if args.op:
        from .bench_op import run_op_bench

        return run_op_bench(args)
    if args.prompt is None and args.prompts is None and args.tokens is None:
        raise UsageError("give the prompt: --prompt TEXT, --prompts FILE or --tokens IDS")
    prompts: list[Any] = []
    if args.prompt is not None:
        from ..generation.prompts import as_prompts

        prompts = as_prompts([args.prompt])
    elif args.prompts:
        from ..generation.prompts import load_prompts

        prompts = load_prompts(args.prompts)
    if any(n < 1 for n in args.lengths):
        raise UsageError("--lengths must be positive")
    if args.plot and not args.modules:
        raise UsageError("--plot draws the module times: add --modules")
    err = Console(stderr=True)
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                  console=err, transient=True, disable=not err.is_terminal) as progress:
        task = progress.add_task("bench", total=None)
        result = run_bench(
            args.reference, args.candidate, args.tokens, prompts=prompts,
            lengths=args.lengths, max_new_tokens=args.max_new_tokens, warmup=args.warmup,
            iters=args.iters, modules=args.modules,
            ref_options=engine_options(args.reference, args.ref_dtype, args.ref_opt),
            cand_options=engine_options(args.candidate, args.cand_dtype, args.cand_opt),
            progress=lambda done, total, what: progress.update(
                task, completed=done, total=total or None, description=what))
    console = Console()
    for item in render(result):
        console.print(item)
    write_reports(args, "bench", result.to_json)
    if args.plot:
        from ..bench.svg import module_chart

        module_chart(result.modules, args.plot)
    return 0
