"""Reports: each command's report is one object (``base.Report``) with a terminal face (rich)
and ``to_json()``; ``faces`` lists the file faces (``--json``, ``--html``) that write it."""

from .base import Report
from .json_report import report_dict, write_json
from .terminal import ComparisonReport

__all__ = ["ComparisonReport", "Report", "report_dict", "write_json"]
