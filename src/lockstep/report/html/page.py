"""Assemble the page: the template, its inline CSS and scripts, and the report's data.

The data goes in a ``<script type="application/json">`` block with ``<``, ``>`` and ``&``
written as ``\\u003c``, ``\\u003e``, ``\\u0026``: a tensor name holding ``</script>`` cannot end
the block. The page's script puts every name into the DOM as text (``textContent``), never
as markup.
"""

from __future__ import annotations

import json
import os
import re
from functools import cache
from importlib import resources
from typing import Any

from ...atomic import write_text_file
from ...jsontext import json_number

__all__ = ["KINDS", "render_html", "write_html", "write_report", "pack", "embed_json"]

#: the report kinds the page's script draws, and each one's title
KINDS = {"comparison": "comparison", "generation": "generation check",
         "inspect": "checkpoint inspection", "against": "checkpoint against checkpoint",
         "weights": "loaded weights", "zoo": "bug zoo", "bench": "benchmark"}

#: the scripts, in order (common helpers first)
_SCRIPTS = ("common.js", "comparison.js", "generation.js", "tables.js", "main.js")
_TABLE = "__table__"  #: marks a packed list of objects: {"__table__": columns, "rows": [...]}
_MIN_PACKED = 16  #: shorter lists stay as they are


@cache
def _static(name: str) -> str:
    return resources.files(__package__).joinpath("static", name).read_text(encoding="utf-8")


def pack(value: Any) -> Any:
    """``value`` with each long list of objects stored as columns and rows (the keys once,
    not once per object), all through; floats made JSON-safe. The page unpacks it."""
    if isinstance(value, float):
        return json_number(value)
    if isinstance(value, dict):
        return {str(k): pack(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        if len(value) >= _MIN_PACKED and all(isinstance(v, dict) for v in value):
            columns: dict[str, None] = {}
            for v in value:
                columns.update(dict.fromkeys(str(k) for k in v))
            names = list(columns)
            return {_TABLE: names,
                    "rows": [[pack(v.get(k)) for k in names] for v in value]}
        return [pack(v) for v in value]
    return value


def embed_json(value: Any) -> str:
    """JSON safe inside an HTML ``<script>`` element (no ``<``, ``>`` or ``&``)."""
    text = json.dumps(value, separators=(",", ":"), ensure_ascii=False, allow_nan=False,
                      default=str)
    return (text.replace("&", "\\u0026").replace("<", "\\u003c").replace(">", "\\u003e")
            .replace("\u2028", "\\u2028").replace("\u2029", "\\u2029"))


def render_html(kind: str, data: Any, *, title: str | None = None) -> str:
    """The whole page for a report of ``kind`` (one of KINDS) holding ``data``."""
    if kind not in KINDS:
        raise ValueError(f"unknown report kind {kind!r}")
    head = f"lockstep {KINDS[kind]}" + (f": {title}" if title else "")
    from ..._version import __version__
    from ..terminal import VERDICT_TEXT

    payload = embed_json({"kind": kind, "title": head, "version": __version__,
                          "words": VERDICT_TEXT, "data": pack(data)})
    script = "\n".join(_static(name) for name in _SCRIPTS)
    parts = {"STYLE": _static("report.css"), "SCRIPT": script, "DATA": payload,
             "TITLE": _escape(head)}
    # one pass over the template: nothing inserted is searched again
    return re.sub(r"\{\{([A-Z]+)\}\}", lambda m: parts[m.group(1)], _static("template.html"))


def _escape(text: str) -> str:
    return (text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
            .replace('"', "&quot;"))


def write_html(kind: str, data: Any, path: str | os.PathLike[str], *,
               title: str | None = None) -> None:
    """Write the page, atomically (a reader never sees half a file)."""
    write_text_file(render_html(kind, data, title=title), path)


def write_report(report: Any, path: str | os.PathLike[str]) -> None:
    """The ``--html`` face (``report.faces``): the page of ``report.kind`` drawing
    ``report.html_json()``."""
    write_html(report.kind, report.html_json(), path)
