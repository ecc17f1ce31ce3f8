"""How the recording ended: a dump its writer never closed (the engine crashed or was
killed), one whose program raised, one with nothing in it."""

from __future__ import annotations

from .flags import RED, Checked, CheckResult, Flag
from .view import DumpView

__all__ = ["check_ending"]


def check_ending(view: DumpView) -> CheckResult:
    """Red where the dump holds no record, where its writer never wrote the end line (its
    last step may be cut short), and where the recorded program raised."""
    dump = view.dump
    records = len(view.entries)
    last = view.entries[-1] if view.entries else None
    flags = []
    if not records:
        flags.append(Flag("ending", RED, "the dump holds no record: nothing was recorded "
                                         "(no module watched, or the engine never ran)"))
    if not dump.complete:
        crashed = dump.meta.get("crashed")
        where = f" after {records} records, the last {last.name} at step {last.step}" \
            if last is not None else ""
        why = crashed or "the engine crashed or was killed"
        flags.append(Flag("ending", RED, "the recording did not end: the writer never wrote "
                          f"the end line{where} ({why}); later records and steps were never "
                          "written", step=last.step if last else None,
                          record=last.name if last else None,
                          seq=last.record.seq if last else None,
                          figures={"records": records, "crashed": crashed}))
    elif dump.error:
        flags.append(Flag("ending", RED, f"the recorded program raised: {dump.error}",
                          step=last.step if last else None,
                          figures={"records": records, "error": dump.error}))
    return CheckResult(tuple(flags), Checked(records, {"complete": dump.complete}, ""))
