"""Teacher forcing: the token an engine feeds at a decode step.

With ``forced`` (the reference's greedy tokens) the candidate is fed those, so one near-tie
does not make every later step incomparable; past their end, or without them, each engine
feeds its own greedy token.
"""

from __future__ import annotations

from typing import Sequence

__all__ = ["fed_token"]


def fed_token(forced: Sequence[int] | None, step: int, greedy: int) -> int:
    """``forced[step]`` when there is one, else ``greedy``."""
    return int(forced[step]) if forced is not None and step < len(forced) else int(greedy)
