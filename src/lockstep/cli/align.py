"""``lockstep align``: how the records of two dumps pair, before anything is measured (a thin
shell over ``lockstep.align.pairing.align``)."""

from __future__ import annotations

import argparse
from typing import Any

from ..atomic import write_text_file
from ..errors import UsageError
from . import output

__all__ = ["register", "run"]

EXIT_OK = 0

def register(sub: Any) -> None:
    """Add the ``align`` subcommand."""
    a = sub.add_parser(
        "align", help="show how two dumps' records pair (names, name tables, a mapping file)",
        description="Pairs the records of two dumps as compare does and shows the pairs of "
                    "one step, how each was found and with which layout transforms, and what "
                    "stayed unpaired. --write turns the pairs into a mapping file to edit "
                    "(docs/mapping.md). Exit code: 0, or 2 for an error.")
    a.add_argument("reference", help="reference dump directory")
    a.add_argument("candidate", help="candidate dump directory")
    a.add_argument("--mapping", metavar="FILE",
                   help="mapping file (docs/mapping.md) applied before the automatic passes")
    a.add_argument("--no-tables", action="store_true", help="leave the name tables out")
    a.add_argument("--write", metavar="FILE",
                   help="write these pairs as a mapping file (TOML) to check and edit")
    a.add_argument("--step", type=int, metavar="N",
                   help="show the pairs of step N (default: the first step)")
    a.add_argument("--json", metavar="FILE", help="also write every step's pairs as JSON")
    a.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    """Pair the two dumps, print the pairs of one step, write what was asked for."""
    from ..align.mapping import load_mapping
    from ..align.mapping_writer import mapping_text
    from ..align.pairing import align
    from ..align.regroup import line_up
    from ..align.render import AlignReport
    from ..batching.layout import refuse_batch_against_run
    from ..store import open_dump

    mapping = load_mapping(args.mapping) if args.mapping else None
    with open_dump(args.reference) as ref_dump, open_dump(args.candidate) as cand_dump:
        # the steps as compare lines them up: cut and joined, then matched by what was fed
        refuse_batch_against_run(ref_dump, cand_dump)
        ref, cand, _, _ = line_up(ref_dump, cand_dump)
        alignment = align(ref, cand, use_tables=not args.no_tables, mapping=mapping)
        steps = sorted(set(ref.steps) | set(cand.steps))
    if args.step is not None and args.step not in steps:
        raise UsageError(f"--step {args.step}: the two dumps have steps "
                         f"{', '.join(map(str, steps)) or 'none'}")
    step = args.step if args.step is not None else (steps[0] if steps else 0)
    output.show(AlignReport(alignment, step, steps, args.reference, args.candidate), args)
    if args.write:
        write_text_file(mapping_text(alignment, reference=args.reference,
                                     candidate=args.candidate), args.write)
        output.say(f"wrote the mapping file {args.write}: check it, then pass it with "
                   f"--mapping {args.write}")
    return EXIT_OK
