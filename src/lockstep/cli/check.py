"""``lockstep check DUMP [--step N] [--json FILE]``: the red flags of one dump, with no
reference (docs/check.md). A multi-rank recording is checked rank by rank."""

from __future__ import annotations

import argparse
from typing import Any

from ..display import safe, text
from . import output

__all__ = ["register", "run"]

EXIT_OK, EXIT_RED, EXIT_ERROR = 0, 1, 2


def register(sub: Any) -> None:
    s = sub.add_parser("check", help="health checks of one dump, no reference: NaN, zeros, "
                                     "attention, RoPE, stuck or skipped layers, explosions",
                       description="Looks for the red flags of a broken engine in one dump "
                                   "(docs/check.md). Exit code: 0 no red flag, 1 red flags "
                                   "found, 2 an unreadable dump or a bad argument.")
    s.add_argument("dump")
    s.add_argument("--step", type=int, help="only this step (the step before it may still be "
                                            "read, to compare with)")
    s.add_argument("--json", metavar="FILE", help="also write the flags and what each check "
                                                  "looked at as JSON (docs/check.md)")
    s.set_defaults(handler=run)


def _figure(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, list):
        return "[" + ", ".join(_figure(v) for v in value[:8]) + (", ...]" if len(value) > 8
                                                                  else "]")
    return safe(value, 80)


def run(args: argparse.Namespace) -> int:
    from ..errors import UsageError
    from ..health import check_dump
    from ..jsontext import json_safe
    from ..store.ranks import is_ranked, open_ranks

    paths = [args.dump]
    if is_ranked(args.dump):  # each rank's dump on its own (the manifest checked first)
        dumps = open_ranks(args.dump)
        paths = [str(d.path) for d in dumps]
        for d in dumps:
            d.close()
    reports = [check_dump(path, step=args.step) for path in paths]
    if args.step is not None and not any(r.steps for r in reports):
        shown = ", ".join(map(str, reports[0].all_steps[:20])) or "none"
        raise UsageError(f"{args.dump} has no step {args.step} (its steps: {shown})")
    for report in reports:
        _show(report)
    if args.json:
        from ..atomic import write_json_file

        body = reports[0].to_json() if len(reports) == 1 else \
            {"ranks": [r.to_json() for r in reports]}
        write_json_file(json_safe(body), args.json)
    return EXIT_RED if any(r.red for r in reports) else EXIT_OK


def _show(report: Any) -> None:
    from rich.table import Table

    console = output.stdout()
    red = report.red
    console.print(text(f"{report.dump}: {report.records} records checked, steps "
                       f"{', '.join(map(str, report.steps[:20])) or 'none'}"
                       f"{' ...' if len(report.steps) > 20 else ''}"))
    if report.flags:
        table = Table(title="red flags" if red else "information")
        for col in ("", "check", "step", "record", "what was seen"):
            table.add_column(col, overflow="fold")
        for f in report.flags:
            table.add_row(text("RED", "bold red") if f.red else text("info", "cyan"),
                          text(f.check), text("-" if f.step is None else f.step),
                          text(f.record or "-", limit=80), text(f.message, limit=1000))
        console.print(table)
    checked = Table(title="checked")
    for col in ("check", "records", "figures seen", "note"):
        checked.add_column(col, overflow="fold")
    for name, c in report.checked.items():
        figures = ", ".join(f"{k} {_figure(v)}" for k, v in c.figures.items())
        checked.add_row(text(name), text(c.records), text(figures), text(c.note))
    console.print(checked)
    if red:
        console.print(text(f"{len(red)} red flag{'s' if len(red) > 1 else ''}", "bold red"))
    else:
        console.print(text("no red flags", "bold green"))
