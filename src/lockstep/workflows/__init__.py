"""What lockstep does with engines, as functions: ``capture`` records one engine on a prompt;
``diff`` records a reference and a candidate on the same tokens and compares them
(``replay_diff``: the dual test around a divergence). The engines themselves, and the kinds of
spec, are in ``lockstep.engines``."""

from __future__ import annotations

from .capture import capture
from .diff import diff, replay_diff

__all__ = ["capture", "diff", "replay_diff"]
