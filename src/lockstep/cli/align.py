"""``lockstep align``: how the records of two dumps pair, before anything is measured (a thin
shell over ``lockstep.align.pairing.align``)."""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from pathlib import Path
from typing import Any, Iterator

from ..errors import UsageError

__all__ = ["register", "run"]

EXIT_OK = 0
_HOWS = ("name", "mapping", "table", "normalized", "structure", "order")


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


def _transforms(pair: Any) -> str:
    parts = []
    if pair.cand_transform:
        parts.append(f"cand {pair.cand_transform}")
    if pair.ref_transform:
        parts.append(f"ref {pair.ref_transform}")
    return "\n".join(parts) or "-"


def _confidence(pair: Any) -> str:
    value = getattr(pair, "confidence", None)
    return "-" if value is None else f"{value:.2f}"


def _render(alignment: Any, step: int, steps: list[int]) -> Iterator[Any]:
    """The rich renderables: a line on the name tables, a per-step summary, the step's
    pairs, its unpaired names."""
    from rich.table import Table
    from rich.text import Text

    tables = getattr(alignment, "tables", None)
    if tables:
        yield Text(f"name tables: {tables[0]} (reference), {tables[1]} (candidate)")
    ignored = getattr(alignment, "ignored", 0)
    if ignored:
        yield Text(f"left out by the mapping file: {ignored} records")
    hows = [h for h in _HOWS if any(p.how == h for p in alignment.pairs)]
    hows += sorted({p.how for p in alignment.pairs} - set(hows))
    summary = Table(title="pairs per step", title_justify="left")
    for col in ("step", "pairs", *hows, "ref only", "cand only"):
        summary.add_column(col, justify="right")
    for s in steps:
        by_how = Counter(p.how for p in alignment.pairs if p.ref.step == s)
        summary.add_row(str(s), str(sum(by_how.values())), *(str(by_how[h]) for h in hows),
                        str(sum(r.step == s for r in alignment.ref_only)),
                        str(sum(c.step == s for c in alignment.cand_only)))
    yield summary
    pairs = [p for p in alignment.pairs if p.ref.step == step]
    evidence = any(getattr(p, "evidence", "") for p in pairs)
    table = Table(title=f"step {step}: {len(pairs)} pairs", title_justify="left")
    for col in ("reference", "candidate", "how", "canonical", "transforms", "confidence"):
        table.add_column(col, overflow="fold")
    if evidence:
        table.add_column("evidence", overflow="fold")
    for p in pairs:
        row = [p.ref.name, p.cand.name, p.how, p.canonical or "-", _transforms(p),
               _confidence(p)]
        table.add_row(*row, *([getattr(p, "evidence", "") or "-"] if evidence else []))
    yield table
    for side, records in (("reference", alignment.ref_only), ("candidate", alignment.cand_only)):
        names = [r.name for r in records if r.step == step]
        if names:
            yield Text(f"{side} only, step {step} ({len(names)}): {', '.join(names)}")


def _json(alignment: Any, reference: str, candidate: str) -> dict[str, Any]:
    def record(r: Any) -> dict[str, Any]:
        return {"step": r.step, "name": r.name, "call": r.call, "shape": list(r.shape)}

    tables = getattr(alignment, "tables", None)
    return {
        "reference": reference, "candidate": candidate,
        "tables": list(tables) if tables else None,
        "ignored": getattr(alignment, "ignored", 0),
        "pairs": [{"step": p.ref.step, "ref": p.ref.name, "cand": p.cand.name,
                   "call": p.ref.call, "how": p.how, "canonical": p.canonical,
                   "ref_transform": p.ref_transform, "cand_transform": p.cand_transform,
                   "confidence": getattr(p, "confidence", None),
                   "evidence": getattr(p, "evidence", None) or None}
                  for p in alignment.pairs],
        "ref_only": [record(r) for r in alignment.ref_only],
        "cand_only": [record(c) for c in alignment.cand_only],
    }


def run(args: argparse.Namespace) -> int:
    """Pair the two dumps, print the pairs of one step, write what was asked for."""
    from rich.console import Console

    from ..align.mapping import load_mapping, mapping_text
    from ..align.pairing import align
    from ..store import open_dump

    mapping = load_mapping(args.mapping) if args.mapping else None
    with open_dump(args.reference) as ref, open_dump(args.candidate) as cand:
        alignment = align(ref, cand, use_tables=not args.no_tables, mapping=mapping)
        steps = sorted(set(ref.steps) | set(cand.steps))
    if args.step is not None and args.step not in steps:
        raise UsageError(f"--step {args.step}: the two dumps have steps "
                         f"{', '.join(map(str, steps)) or 'none'}")
    step = args.step if args.step is not None else (steps[0] if steps else 0)
    console = Console()
    for item in _render(alignment, step, steps):
        console.print(item, highlight=False)
    if args.write:
        Path(args.write).write_text(mapping_text(alignment, reference=args.reference,
                                                 candidate=args.candidate), encoding="utf-8")
        print(f"wrote the mapping file {args.write}: check it, then pass it with "
              f"--mapping {args.write}", file=sys.stderr)
    if args.json:
        Path(args.json).write_text(json.dumps(_json(alignment, args.reference, args.candidate),
                                              indent=1) + "\n", encoding="utf-8")
    return EXIT_OK
