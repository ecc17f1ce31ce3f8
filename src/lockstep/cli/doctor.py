"""``lockstep doctor``: the environment report to paste into a bug report."""

from __future__ import annotations

import argparse
from typing import Any

from . import output

__all__ = ["register", "run"]


def register(sub: Any) -> None:
    d = sub.add_parser("doctor", help="report versions, engines, llama.cpp's build and the CPU "
                                      "(paste it into bug reports)",
                       description="Versions of lockstep and its dependencies, which engines "
                                   "import and why one does not, llama.cpp's system info and "
                                   "build flags, the CPU features granted to this process, and "
                                   "the cache. Exit code 0 always (it reports, it does not "
                                   "judge).")
    d.add_argument("--json", metavar="FILE", help="also write the report as JSON")
    d.set_defaults(handler=run)


def _size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024  # type: ignore[assignment]
    return str(n)


def _yes(value: bool | None) -> str:
    return "unknown" if value is None else ("yes" if value else "no")


def lines(doc: Any) -> list[str]:
    """The report as plain text lines (no markup: it is pasted into issues)."""
    out = ["lockstep doctor", "", "versions"]
    for name, version in doc.versions.items():
        out.append(f"  {name:18} {version if version is not None else 'not installed'}")
    out += ["", "engines"]
    for name, why in doc.engines.items():
        out.append(f"  {name:18} {'ok' if why is None else 'unavailable: ' + why}")
    ll = doc.llama_cpp
    out += ["", "llama.cpp"]
    if ll.get("error"):
        out.append(f"  error              {ll['error']}")
    else:
        out.append(f"  library            {ll.get('library')}")
        out.append(f"  system info        {ll.get('system_info')}")
    flags = ll.get("build_flags") or "unknown (not built by make setup)"
    out.append(f"  build flags        {flags}")
    for lib, count in (ll.get("amx_instructions") or {}).items():
        text = "objdump not available" if count is None else str(count)
        out.append(f"  AMX instructions   {text} in {lib}")
    cpu = doc.cpu
    amx = cpu["amx_tile_state"]
    out += ["", "cpu",
            f"  model              {cpu['model']} ({cpu['machine']}, {cpu['usable_cpus']} usable)",
            f"  features granted   {' '.join(cpu['flags']) or 'none of interest'}",
            f"  AMX tile state     kernel supports: {_yes(amx['kernel_supports'])}; granted to "
            f"this process: {_yes(amx['granted_to_this_process'])}"]
    c = doc.cache
    state = f"{_size(c['bytes'])} in {c['files']} files" if c["exists"] else "not created yet"
    out += ["", "cache", f"  {c['path']}  {state}  (LOCKSTEP_CACHE moves it)"]
    return out


def run(args: argparse.Namespace) -> int:
    from ..doctor import diagnose_environment

    doc = diagnose_environment()
    output.write_lines(lines(doc))
    if args.json:
        from ..atomic import write_json_file

        write_json_file(doc.to_json(), args.json)
    return 0
