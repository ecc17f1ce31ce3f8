"""Reports: the terminal renderable and the JSON document, from the same Comparison."""

from .json_report import report_dict, write_json
from .terminal import ComparisonReport

__all__ = ["ComparisonReport", "report_dict", "write_json"]
