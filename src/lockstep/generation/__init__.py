"""The generation check: greedy decoding on a reference and a candidate engine, side by side.

Free-running (each side its own tokens) and teacher-forced (the candidate fed the reference's)
agreement, near-ties told apart from real splits, KL statistics, garbage detectors, and at a
real split the tensor comparison that names the first divergent tensor.
"""

from .check import check_generation
from .garbage import GarbageFlag
from .metrics import NEAR_TIE, KLStats, StepCompare, StepSummary
from .prompts import Prompt, load_prompts
from .result import FreeRun, GenerationResult, Localization, PromptResult

__all__ = ["check_generation", "GenerationResult", "PromptResult", "FreeRun", "Localization",
           "StepCompare", "StepSummary", "KLStats", "GarbageFlag", "Prompt", "load_prompts",
           "NEAR_TIE"]
