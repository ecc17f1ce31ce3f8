"""``lockstep bench``: time to first token, tokens/s, peak memory and time per module of two
engines side by side, with confidence intervals."""

from __future__ import annotations

import argparse
from typing import Any

from ..engines.registry import kinds_with, spec_help
from . import output
from .options import add_report_files, engine_options, int_list

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
    b.add_argument("--warmup", type=int, default=10,
                   help="rounds not kept, split over the forks, at least one in each "
                        "(default 10)")
    b.add_argument("--iters", type=int, default=100,
                   help="rounds measured, split over the forks (default 100)")
    b.add_argument("--forks", type=int, default=5, metavar="N",
                   help="fresh process pairs the rounds are split over, one after the other, "
                        "each loaded and warmed up anew; the intervals take the spread "
                        "between processes in (default 5; 1: one process per engine)")
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


def run(args: argparse.Namespace) -> int:
    from rich.progress import BarColumn, MofNCompleteColumn, TextColumn

    from ..bench.render import BenchReport
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
    with output.progress(TextColumn("{task.description}"), BarColumn(),
                         MofNCompleteColumn()) as progress:
        task = progress.add_task("bench", total=None)
        result = run_bench(
            args.reference, args.candidate, args.tokens, prompts=prompts,
            lengths=args.lengths, max_new_tokens=args.max_new_tokens, warmup=args.warmup,
            iters=args.iters, modules=args.modules, forks=args.forks,
            ref_options=engine_options(args.reference, args.ref_dtype, args.ref_opt),
            cand_options=engine_options(args.candidate, args.cand_dtype, args.cand_opt),
            progress=lambda done, total, what: progress.update(
                task, completed=done, total=total or None, description=what))
    output.show(BenchReport(result), args)
    if args.plot:
        from ..bench.svg import module_chart

        module_chart(result.modules, args.plot)
    return 0
