"""Everything the command line prints goes through here: one console for stdout, one for
stderr, the plain-line writer, progress bars, and the reports with their file faces.

The consoles are made once per command (``start``, called by ``main``), so that they read the
environment (``COLUMNS``, ``NO_COLOR``...) of the command that runs. Text the terminal cannot
encode (a lone surrogate in a record's name: valid JSON) is printed escaped (``\\ud800``)
rather than ending the command.
"""

from __future__ import annotations

import argparse
import sys
from typing import TYPE_CHECKING, Any, Iterable

if TYPE_CHECKING:
    from rich.console import Console
    from rich.progress import Progress, ProgressColumn

__all__ = ["start", "stdout", "stderr", "out", "show", "write_lines", "say", "progress"]

_consoles: dict[str, Console] = {}


def start() -> None:
    """Begin a command: streams that escape what they cannot encode, fresh consoles."""
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.reconfigure(errors="backslashreplace")  # type: ignore[union-attr]
        except (AttributeError, ValueError, OSError):  # not a text stream we may reconfigure
            pass
    _consoles.clear()


def _console(name: str) -> Console:
    if name not in _consoles:
        from rich.console import Console

        _consoles[name] = Console(stderr=name == "stderr")
    return _consoles[name]


def stdout() -> Console:
    """The console of standard output, where reports go."""
    return _console("stdout")


def stderr() -> Console:
    """The console of standard error: progress, status, messages."""
    return _console("stderr")


def out(*renderables: Any, **options: Any) -> None:
    """Print each renderable on standard output (``options`` as for ``Console.print``)."""
    console = stdout()
    for item in renderables:
        console.print(item, **options)


def show(report: Any, args: argparse.Namespace | None = None) -> None:
    """Print a report (``report.base.Report``) and write the file faces ``args`` asks for
    (``--json FILE``, ``--html FILE``: ``report.faces``)."""
    from ..report.faces import FACES, write_faces

    out(report)
    if args is not None:
        write_faces(report, {face.name: getattr(args, face.name, None) for face in FACES})


def write_lines(lines: Iterable[str], *, err: bool = False) -> None:
    """Plain lines, not laid out by rich (as they are, and fast for any number of them); a
    character the stream cannot encode is written as its escape."""
    stream = sys.stderr if err else sys.stdout
    encoding = getattr(stream, "encoding", None) or "utf-8"
    buffer = getattr(stream, "buffer", None)
    stream.flush()
    for line in lines:
        if buffer is not None:
            buffer.write((line + "\n").encode(encoding, "backslashreplace"))
        else:
            stream.write(line + "\n")
    stream.flush()


def say(line: str) -> None:
    """One line on stderr, whatever it holds (a path with undecodable bytes included)."""
    write_lines([line], err=True)


def progress(*columns: str | ProgressColumn) -> Progress:
    """A progress display on stderr, shown only on a terminal and gone when done."""
    from rich.progress import Progress

    err = stderr()
    return Progress(*columns, console=err, transient=True, disable=not err.is_terminal)
