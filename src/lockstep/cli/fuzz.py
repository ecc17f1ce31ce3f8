"""``lockstep fuzz``: search for the inputs where a candidate engine parts from the
reference (a thin shell over ``lockstep.fuzz.fuzz``)."""

from __future__ import annotations

import argparse
from typing import Any

from ..engines.registry import kinds_epilog, spec_help
from . import output
from .options import add_side_options, side_options

__all__ = ["register", "run"]

EXIT_OK, EXIT_FAILED = 0, 1


def register(sub: Any) -> None:
    """Add the ``fuzz`` subcommand."""
    from ..fuzz.search import DEFAULT_BUDGET, SHRINK_BUDGET
    from ..generation.metrics import MAX_KL, NEAR_TIE

    f = sub.add_parser(
        "fuzz", help="search for the inputs where the candidate parts from the reference",
        description="Try inputs where engines break (an empty prompt, lengths 1, 2 and around "
                    "every power of two, the KV block size and the context limit, decode steps "
                    "up to it, repeated and special tokens, then random prompts) with the "
                    "teacher-forced generation check; shrink every failure to the smallest "
                    "input that still fails and compare the tensors there. Drift is not a "
                    "failure; an engine that crashes on an input is. Exit code: 0 no failing "
                    "input, 1 failing inputs, 2 error.",
        epilog=kinds_epilog())
    f.add_argument("reference", help=spec_help())
    f.add_argument("candidate", help="engine spec, as for the reference")
    f.add_argument("--budget", type=int, default=DEFAULT_BUDGET, metavar="N",
                   help=f"inputs to try, shrinking not counted (default {DEFAULT_BUDGET})")
    f.add_argument("--seed", type=int, default=0, metavar="S",
                   help="the seed of the inputs: the same seed, the same run (default 0)")
    f.add_argument("--max-length", type=int, metavar="N",
                   help="no input fills more positions than N (default: the model's context, "
                        "or 1024 when no engine knows it)")
    f.add_argument("--shrink-budget", type=int, default=SHRINK_BUDGET, metavar="N",
                   help=f"checks one failing input's shrinking may take (default "
                        f"{SHRINK_BUDGET})")
    add_side_options(f)
    f.add_argument("--near-tie", type=float, default=NEAR_TIE, metavar="X",
                   help=f"as for generate (default {NEAR_TIE})")
    f.add_argument("--max-kl", type=float, default=MAX_KL, metavar="X",
                   help=f"no step may go over X nats, whatever the baseline's drift "
                        f"(default {MAX_KL})")
    f.add_argument("--no-localize", action="store_true",
                   help="do not record and compare tensors at the minimal failing inputs")
    f.add_argument("--out", default="lockstep-fuzz", metavar="DIR",
                   help="where the dumps of the minimal failing inputs go "
                        "(default lockstep-fuzz/)")
    f.add_argument("--json", metavar="FILE", help="also write the report as JSON")
    f.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    """Search, print the report; 0 no failing input, 1 failing inputs."""
    from rich.progress import BarColumn, MofNCompleteColumn, TextColumn

    from ..fuzz import fuzz
    from ..fuzz.render import FuzzReport

    ref_options, cand_options = side_options(args)
    err = output.stderr()
    announce = (lambda m: err.print(m, highlight=False)) if err.is_terminal else output.say
    with output.progress(TextColumn("fuzzing"), BarColumn(), MofNCompleteColumn(),
                         TextColumn("inputs")) as progress:
        task = progress.add_task("fuzzing", total=args.budget)
        result = fuzz(
            args.reference, args.candidate, budget=args.budget, seed=args.seed,
            max_length=args.max_length, shrink_budget=args.shrink_budget,
            near_tie=args.near_tie, max_kl=args.max_kl, localize=not args.no_localize,
            out=args.out,
            ref_options=ref_options, cand_options=cand_options,
            progress=lambda done, total: progress.update(task, completed=done, total=total),
            announce=announce)
    output.show(FuzzReport(result), args)
    return EXIT_OK if result else EXIT_FAILED
