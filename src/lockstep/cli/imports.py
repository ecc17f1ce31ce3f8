"""``lockstep import sglang DIR --out DUMP``: another tool's dumps as a lockstep dump, which
``compare`` then pairs, measures and diagnoses like any other (lockstep.importers)."""

from __future__ import annotations

import argparse
from typing import Any

from ..display import safe, text
from . import output

__all__ = ["register", "run"]

FORMATS = ("sglang",)


def register(sub: Any) -> None:
    s = sub.add_parser("import", help="read another tool's dumps (SGLang's dumper) into a "
                                      "lockstep dump",
                       description="sglang: the experiment directory SGLang's dumper wrote "
                                   "(DUMPER_DIR/EXP_NAME, one .pt file per tensor, any "
                                   "version), read with torch.load(weights_only=True), as "
                                   "one dump (one per rank under it for several ranks). Exit "
                                   "code 0, or 2 for a directory that holds no such dump.")
    s.add_argument("format", choices=FORMATS, help="the tool that wrote the dumps")
    s.add_argument("source", help="the directory of its dump files")
    s.add_argument("--out", required=True, metavar="DUMP", help="the lockstep dump to write")
    s.add_argument("--overwrite", action="store_true", help="replace an existing dump")
    s.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from rich.progress import BarColumn, MofNCompleteColumn, TextColumn

    from ..importers.sglang import import_sglang

    with output.progress(TextColumn("importing"), BarColumn(),
                         MofNCompleteColumn()) as progress:
        task = progress.add_task("importing", total=None)
        result = import_sglang(args.source, args.out, overwrite=args.overwrite,
                               progress=lambda done, total: progress.update(
                                   task, completed=done, total=total))
    console = output.stdout()
    ranks = f", {result.ranks} ranks (one dump each under it)" if result.ranks > 1 else ""
    console.print(text(f"{safe(args.out)}: {result.records} records, {result.steps} steps"
                       f"{ranks}, from {result.files} files of {safe(args.source)}"))
    if result.skipped:
        console.print(text(f"skipped {len(result.skipped)} files:"))
        for name, why in result.skipped[:10]:
            console.print(text(f"  {safe(name, 160)}: {safe(why, 200)}"))
        if len(result.skipped) > 10:
            console.print(text(f"  ... and {len(result.skipped) - 10} more"))
    return 0
