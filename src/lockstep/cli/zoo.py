"""``lockstep zoo``: run the bug zoo and print where lockstep localized each bug."""

from __future__ import annotations

import argparse
import tempfile
from typing import Any

from ..errors import UsageError
from ..zoo.config import ZOO_FAMILIES as FAMILIES
from . import output
from .options import add_report_files

__all__ = ["register", "run"]


def register(sub: Any) -> None:
    z = sub.add_parser("zoo", help="run every bug of the zoo's mini engine against "
                                   "transformers and score lockstep's localization",
                       description="Run the bug zoo (docs/zoo.md): a tiny model of each "
                                   f"family ({', '.join(FAMILIES)}), each bug switched on in "
                                   "turn, compared with transformers.")
    z.add_argument("--bug", action="append", metavar="NAME", help="only this bug (repeatable)")
    z.add_argument("--family", action="append", choices=FAMILIES,
                   help="only this model family (repeatable)")
    z.add_argument("--out", help="keep the dumps here (default: a temporary directory)")
    add_report_files(z, "also write the score as JSON")
    z.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from ..report.zoo_table import ZooTable
    from ..zoo.batch_bugs import BATCH_BUGS
    from ..zoo.batch_score import BATCH_FAMILY, run_batch_zoo
    from ..zoo.bugs import get_bug
    from ..zoo.score import ZooScore, run_zoo

    for name in args.bug or ():
        get_bug(name)  # an unknown name is a one-line error before anything runs
    solo = None if args.bug is None else [b for b in args.bug if b not in BATCH_BUGS]
    batch = None if args.bug is None else [b for b in args.bug if b in BATCH_BUGS]
    families = args.family or FAMILIES
    if batch and BATCH_FAMILY not in families:
        raise UsageError(f"the batch bugs ({', '.join(batch)}) run on the {BATCH_FAMILY} "
                         f"model: add --family {BATCH_FAMILY}")
    with tempfile.TemporaryDirectory() as tmp, \
            output.stderr().status("running the zoo") as status:
        score = ZooScore((), (), 0.0) if solo == [] else run_zoo(
            args.out or tmp, families=families, bugs=solo,
            progress=lambda m: status.update(f"zoo: {m}"))
        if BATCH_FAMILY in families and (batch is None or batch):  # a few seconds
            more = run_batch_zoo(args.out or tmp, bugs=batch, controls=batch is None,
                                 progress=lambda m: status.update(f"zoo: {m}"))
            score = ZooScore(score.results + more.results, score.controls + more.controls,
                             score.seconds + more.seconds)
    output.show(ZooTable(score), args)
    return 0 if score else 1
