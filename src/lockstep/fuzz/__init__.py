"""``lockstep fuzz``: a search for the inputs where a candidate engine parts from a reference.

Inputs come from where engines break (lengths at powers of two, the KV block size and the
context limit, repeated and special tokens, an empty prompt, batches mixing very different
lengths); each is checked with the
teacher-forced generation check (logits only), every failure is shrunk to the smallest input
that still fails, and each minimal failure is localized with the tensor comparison.
"""

from __future__ import annotations

from .inputs import BatchInput, FuzzInput, Space
from .result import Finding, FuzzResult
from .search import fuzz

__all__ = ["BatchInput", "Finding", "FuzzInput", "FuzzResult", "Space", "fuzz"]
