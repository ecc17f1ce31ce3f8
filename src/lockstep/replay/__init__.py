"""Replay, the dual test: a reference op re-run on the candidate's recorded input tells the
error it introduces from the error it inherits, and the same op with its operands rounded to
a lower precision tells precision noise from a bug, by measurement."""

from .run import Replay, ReplayOp, replay_comparison

__all__ = ["Replay", "ReplayOp", "replay_comparison"]
