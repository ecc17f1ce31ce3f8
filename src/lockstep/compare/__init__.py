"""Comparison: pure metrics, dtype-aware tolerances, and the match/drift/diverged verdict."""

from .comparison import Comparison, DumpSummary, compare
from .diagnosis import Diagnosis, diagnose
from .metrics import TensorMetrics, TopK, tensor_metrics
from .pair_result import PairResult
from .tolerance import Tolerances

__all__ = ["Comparison", "DumpSummary", "compare", "TensorMetrics", "TopK", "tensor_metrics",
           "Tolerances", "PairResult", "Diagnosis", "diagnose"]
