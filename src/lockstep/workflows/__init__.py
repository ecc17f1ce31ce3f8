"""What lockstep does with engines, as functions: ``capture`` records one engine on a prompt;
``diff`` records a reference and a candidate on the same tokens and compares them
(``replay_diff``: the dual test around a divergence); ``batch_diff`` and ``capture_batch``
run a candidate on several prompts as one batch (docs/batching.md). The engines themselves,
and the kinds of spec, are in ``lockstep.engines``."""

from __future__ import annotations

from .batch import batch_diff, capture_batch
from .capture import capture
from .diff import diff, replay_diff

__all__ = ["batch_diff", "capture", "capture_batch", "diff", "replay_diff"]
