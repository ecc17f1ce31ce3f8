"""Where a multi-rank recording keeps its files (store.ranks reads them; docs/format.md
"Ranks")."""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["MANIFEST_FILE", "MANIFEST_FORMAT", "rank_dir", "is_ranked", "manifest",
           "MAX_RANKS"]

MANIFEST_FILE = "ranks.json"
MANIFEST_FORMAT = "lockstep-ranks"
MAX_RANKS = 4096  #: the most ranks a manifest may name


def rank_dir(path: str | os.PathLike[str], rank: int) -> Path:
    """Where rank ``rank`` of a multi-rank recording at ``path`` writes its dump."""
    return Path(path) / f"rank{rank}"


def is_ranked(path: str | os.PathLike[str]) -> bool:
    """Whether ``path`` is a multi-rank recording (it holds a ranks manifest)."""
    return (Path(path) / MANIFEST_FILE).is_file()


def manifest(world_size: int) -> dict[str, object]:
    """The manifest of a recording of ``world_size`` ranks."""
    return {"format": MANIFEST_FORMAT, "version": 1, "world_size": world_size}
