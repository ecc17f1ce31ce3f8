"""``lockstep show DUMP``: what a dump holds, summarised (per step counts, the first records),
or every record with ``--all``."""

from __future__ import annotations

import argparse
from collections import Counter
from typing import Any

from ..display import safe, text
from . import output

__all__ = ["register", "run"]

DEFAULT_LIMIT = 200
_STEP_ROWS = 100  # steps listed in the per-step table


def register(sub: Any) -> None:
    s = sub.add_parser("show", help="summarise a dump: metadata, records per step, the first "
                                    "records",
                       description="Prints the dump's metadata, a table of records per step, "
                                   f"and the first {DEFAULT_LIMIT} records (--limit, --all) "
                                   "with their statistics. Exit code 0, or 2 when the dump is "
                                   "unreadable.")
    s.add_argument("dump")
    s.add_argument("--step", type=int, help="only this step")
    s.add_argument("--limit", type=int, default=DEFAULT_LIMIT, metavar="N",
                   help=f"records listed (default {DEFAULT_LIMIT})")
    s.add_argument("--all", action="store_true", help="list every record")
    s.set_defaults(handler=run)


def _number(value: Any) -> str:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return "-"
    try:
        return f"{float(value):.4g}"
    except OverflowError:
        return "-"


def _steps(steps: list[int]) -> str:
    if not steps:
        return "none"
    if steps[-1] - steps[0] == len(steps) - 1:  # sorted and distinct: contiguous
        return f"{steps[0]}-{steps[-1]}" if len(steps) > 1 else str(steps[0])
    return ", ".join(map(str, steps[:20])) + (" ..." if len(steps) > 20 else "")


_COLUMNS = ("step", "seq", "name", "dtype", "shape", "min", "max", "mean", "nan/inf")


def _row(dump: Any, rec: Any) -> tuple[str, ...]:
    st = dump.stats(rec) if rec.has_data or rec.stats else {}
    return (str(rec.step), str(rec.seq), safe(rec.name or '""', 200), rec.dtype,
            "x".join(map(str, rec.shape)) or "scalar",
            *(_number(st.get(k)) for k in ("min", "max", "mean")),
            f"{safe(st.get('nan', '-'), 20)}/{safe(st.get('inf', '-'), 20)}")


def _write_rows(dump: Any, records: list[Any]) -> None:
    """Aligned plain-text rows: every name as the text it is, and fast for any number of
    records (a rich table of 20,000 rows takes 20 s to lay out)."""
    rows = [_COLUMNS, *(_row(dump, rec) for rec in records)]
    widths = [max(len(r[i]) for r in rows) for i in range(len(_COLUMNS))]
    output.write_lines("  ".join(cell.rjust(w) if i in (0, 1) else cell.ljust(w)
                                 for i, (cell, w) in enumerate(zip(r, widths))).rstrip()
                       for r in rows)


def run(args: argparse.Namespace) -> int:
    from rich.table import Table

    from ..errors import UsageError
    from ..store import open_dump

    if args.limit < 0:
        raise UsageError("--limit must be 0 or more")
    with open_dump(args.dump) as dump:
        console = output.stdout()
        state = "complete" if dump.complete else "INCOMPLETE (writer stopped before closing)"
        console.print(text(f"{dump.path}: {len(dump.records)} records, steps "
                           f"{_steps(dump.steps)}, {state}"))
        if dump.error:
            console.print(text(f"  the program raised: {dump.error}", limit=2000))
        for key, value in sorted(dump.meta.items()):
            console.print(text(f"  {key}: {safe(value, 2000)}"))
        records = [r for r in dump.records if args.step is None or r.step == args.step]
        per_step = Counter(r.step for r in records)
        with_data = Counter(r.step for r in records if r.has_data)
        steps = Table(title="records per step")
        for col in ("step", "records", "with data", "stats only"):
            steps.add_column(col, justify="right")
        for step in sorted(per_step)[:_STEP_ROWS]:
            steps.add_row(str(step), str(per_step[step]), str(with_data[step]),
                          str(per_step[step] - with_data[step]))
        console.print(steps)
        if len(per_step) > _STEP_ROWS:
            console.print(f"... {len(per_step) - _STEP_ROWS} more steps (--step S shows one)",
                          highlight=False)
        shown = records if args.all else records[:args.limit]
        if shown:
            console.print(f"records ({len(shown)} of {len(records)})", highlight=False)
            _write_rows(dump, shown)
        if len(shown) < len(records):
            console.print(f"... {len(records) - len(shown)} more records: --all lists every "
                          "one, --limit N the first N, --step S one step", highlight=False)
    return 0
