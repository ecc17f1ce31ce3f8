"""``lockstep split BATCH --out DIR``: one dump per sequence of a batched run (padded, packed
with a layout written, or packed with none: whose token is whose found from the ids each step
was fed), each comparable with that prompt's solo run."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from ..display import text
from . import output

__all__ = ["register", "run"]


def register(sub: Any) -> None:
    s = sub.add_parser("split", help="split a batched dump into one dump per sequence",
                       description="Writes OUT/NAME-I.lsd for each sequence I of a batched "
                                   "dump (lockstep capture --batch, or any engine's batched "
                                   "recording with its layout or its prompts in the "
                                   "metadata), each laid out as a one-prompt run of that "
                                   "sequence: compare it with the prompt's solo run. Exit "
                                   "code 0, or 2 for a dump that is not a batch or whose "
                                   "steps do not fit its prompts.")
    s.add_argument("dump", help="the batched dump")
    s.add_argument("--out", required=True, metavar="DIR", help="where the dumps go")
    s.add_argument("--name", default="candidate",
                   help="the split dumps' name before -I.lsd (default candidate)")
    s.add_argument("--reference", action="append", metavar="DUMP", default=None,
                   help="sequence I's solo reference, once per sequence in order (the batch "
                        "diagnoses read the other sequences' references)")
    s.add_argument("--overwrite", action="store_true", help="replace existing dumps")
    s.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from ..batching.split import layout_of, split_batch
    from ..errors import UsageError
    from ..store import open_dump

    with open_dump(args.dump) as dump:
        layout = layout_of(dump)
    count = len(layout.prompts)
    if args.reference is not None and len(args.reference) != count:
        raise UsageError(f"--reference given {len(args.reference)} times for {count} "
                         "sequences: give one per sequence, in order, or none")
    out = Path(args.out)
    targets = [out / f"{args.name}-{i}.lsd" for i in range(count)]
    taken = [str(p) for p in targets if p.exists()]
    if taken and not args.overwrite:
        raise UsageError(f"{taken[0]} exists (--overwrite replaces it)")
    paths = split_batch(args.dump, out, references=args.reference, name=args.name,
                        layout=layout)
    console = output.stdout()
    how = f"{layout.padding} padding" if layout.padding else "packed"
    console.print(text(f"{args.dump}: {count} sequences, {len(layout.steps)} batch steps, "
                       f"{how}"))
    for i, path in enumerate(paths):
        mine = layout.of(i)
        first = mine[0][1].position or 0 if mine else 0
        cached = f", from token {first} (the tokens before came from a cache)" if first else ""
        moved = [st.step for st, seg in mine if seg.moved]
        off = f"; positions moved at batch steps {moved}" if moved else ""
        console.print(text(f"  sequence {i}: {path}  ({len(layout.prompts[i])} prompt "
                           f"tokens, {len(mine)} steps from batch step "
                           f"{mine[0][0].step if mine else '-'}{cached}{off})"))
    return 0
