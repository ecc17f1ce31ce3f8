"""What every report is: one object that each face draws.

A report is a rich renderable (``__rich_console__``: the terminal face) that also gives its
JSON object (``to_json()``: the ``--json`` face, and the data the ``--html`` page draws).
``kind`` names it for the HTML page (``report.html.KINDS``). The faces that write files are
listed in ``report.faces``; the command line prints a report with ``cli.output.show``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from rich.console import Console, ConsoleOptions, RenderResult

__all__ = ["Report", "SubjectReport"]


class Report:
    """Base of the reports: subclasses set ``kind`` and define ``render`` and ``to_json``."""

    kind: str = ""

    def __rich_console__(self, console: Console, options: ConsoleOptions) -> RenderResult:
        yield from self.render(console, options)

    def render(self, console: Console, options: ConsoleOptions) -> RenderResult:
        """The terminal face: the renderables, in order."""
        raise NotImplementedError

    def to_json(self) -> dict[str, Any]:
        """The JSON face: a dict of JSON types (docs/report.md)."""
        raise NotImplementedError

    def html_json(self) -> dict[str, Any]:
        """What the HTML page draws: ``to_json()`` unless a report shows more there."""
        return self.to_json()


@dataclass
class SubjectReport(Report):
    """The report of a result that gives its own JSON (``subject.to_json()``: a checkpoint
    check, a benchmark); subclasses draw it, ``rows`` bounding their tables."""

    subject: Any
    rows: int = 40

    def to_json(self) -> dict[str, Any]:
        result: dict[str, Any] = self.subject.to_json()
        return result
