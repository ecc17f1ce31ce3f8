"""``lockstep bench --op NAME REF.lsd CAND.lsd``: one op of each implementation timed on the
inputs its dump recorded, with the error between them (``bench.op``)."""

from __future__ import annotations

import argparse
from typing import Any

__all__ = ["add_op_arguments", "run_op_bench"]


def add_op_arguments(b: Any) -> None:
    g = b.add_argument_group("op microbenchmark (--op NAME REF.lsd CAND.lsd)")
    g.add_argument("--op", metavar="NAME", help="time this op (a reference record's name, "
                                                "e.g. model.layers.0.self_attn) of each dump's "
                                                "engine on the inputs the dumps recorded")
    g.add_argument("--step", type=int, metavar="N", help="the step whose inputs to use "
                                                         "(default: the first that has the op)")
    g.add_argument("--cand-op", metavar="NAME", help="the candidate's record (default: the "
                                                     "one the comparison pairs with NAME)")
    g.add_argument("--ref-engine", metavar="SPEC", help="the reference's engine (default: the "
                                                        "spec its dump names)")
    g.add_argument("--cand-engine", metavar="SPEC", help="the candidate's engine (default: the "
                                                         "spec its dump names)")


def run_op_bench(args: argparse.Namespace) -> int:
    from rich.progress import BarColumn, MofNCompleteColumn, TextColumn

    from ..bench.op import bench_op
    from ..bench.render import OpBenchReport
    from . import output
    from .options import engine_options

    def opts(spec: str | None, dtype: str, given: list[str], default: str) -> dict[str, Any]:
        options = engine_options(spec or "", dtype, given)
        if dtype == default:  # not given: the dtype the dump recorded
            options.pop("dtype", None)
        return options

    if getattr(args, "html", None):
        from ..errors import UsageError

        raise UsageError("--html draws the engine benchmark; for --op write --json")
    with output.progress(TextColumn("{task.description}"), BarColumn(),
                         MofNCompleteColumn()) as progress:
        task = progress.add_task("bench --op", total=None)
        result = bench_op(
            args.reference, args.candidate, args.op, cand_name=args.cand_op, step=args.step,
            ref_spec=args.ref_engine, cand_spec=args.cand_engine,
            ref_options=opts(args.ref_engine, args.ref_dtype, args.ref_opt, "float32"),
            cand_options=opts(args.cand_engine, args.cand_dtype, args.cand_opt, "float32"),
            warmup=args.warmup, iters=args.iters,
            progress=lambda done, total, what: progress.update(
                task, completed=done, total=total or None, description=what))
    output.show(OpBenchReport(result), args)
    return 0
