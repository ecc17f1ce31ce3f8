"""The HTML report: one self-contained page drawn from the same JSON objects as ``--json``.

``render_html(kind, data)`` returns the page; ``write_html`` writes it atomically;
``write_report(report, path)`` is the ``--html`` face of any report (``report.faces``). ``data`` is
the JSON report of the command (``report_dict``, ``generation_dict``, a checkpoint report's
``to_json()``...), embedded as JSON and drawn in the browser by the page's own script: no
network request, no external file.
"""

from .page import KINDS, render_html, write_html, write_report

__all__ = ["KINDS", "render_html", "write_html", "write_report"]
