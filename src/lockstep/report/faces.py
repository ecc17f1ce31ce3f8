"""The faces a report is written in besides the terminal: one entry per file format.

Each face is a command-line option (``--json FILE``, ``--html FILE``) and a writer
``write(report, path)`` named as ``"module:function"`` and imported only when used. A new face
(SVG, Markdown...) is one module with its writer plus one entry here; every command that
prints a report gets the option.
"""

from __future__ import annotations

import importlib
import os
from dataclasses import dataclass
from typing import Any, Mapping

__all__ = ["Face", "FACES", "write_faces"]


@dataclass(frozen=True)
class Face:
    name: str  #: the option (``--NAME FILE``) and its attribute on the parsed arguments
    help: str
    writer: str  #: ``"module:function"``; the function takes ``(report, path)``

    def write(self, report: Any, path: str | os.PathLike[str]) -> None:
        module, _, func = self.writer.partition(":")
        getattr(importlib.import_module(module), func)(report, path)


FACES = (
    Face("json", "also write the report as JSON", "lockstep.report.json_report:write_report"),
    Face("html", "also write the report as one self-contained HTML page (no network request; "
                 "open it in a browser)", "lockstep.report.html:write_report"),
)


def write_faces(report: Any, paths: Mapping[str, Any]) -> None:
    """Write ``report`` in each face that ``paths`` gives a file for (``{"json": FILE}``)."""
    for face in FACES:
        if paths.get(face.name):
            face.write(report, paths[face.name])
