"""``lockstep bench``: speed beside correctness. Time to first token, prompt and decode
tokens/s, peak memory and time per module, of a reference and a candidate engine side by
side, with confidence intervals."""

from .stats import Ratio, Summary, ratio, summarize

__all__ = ["Ratio", "Summary", "ratio", "summarize"]
