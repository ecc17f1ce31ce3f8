"""The recorder in a torch.distributed run: which rank this is, and where its dump goes."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

from ..atomic import write_json_file
from ..errors import UsageError
from ..store.ranks import MANIFEST_FILE, manifest, rank_dir
from ..store.writer import INDEX_FILE

__all__ = ["distributed_rank", "rank_path", "shard_field", "SHARD_RULES"]

SHARD_RULES = ("col", "row", "replicated")


def distributed_rank() -> tuple[int, int] | None:
    """``(rank, world_size)`` inside an initialized torch.distributed program of more than
    one process; None otherwise (torch never imported counts as not distributed)."""
    dist = sys.modules.get("torch.distributed")
    if dist is None or not dist.is_available() or not dist.is_initialized():
        return None
    size = int(dist.get_world_size())
    return (int(dist.get_rank()), size) if size > 1 else None


def rank_path(path: str | os.PathLike[str], rank: int, world_size: int) -> Path:
    """The dump directory of ``rank`` under ``path``; rank 0 writes the manifest.
    (``record(overwrite=True)`` applies to each rank's own dump.)"""
    root = Path(path)
    if (root / INDEX_FILE).exists():  # also with overwrite: its files are not a rank's
        raise UsageError(f"{root} holds a single-process dump; a tensor-parallel run writes "
                         "one dump per rank under its path: choose another path or remove it")
    if rank == 0:
        try:
            root.mkdir(parents=True, exist_ok=True)
            write_json_file(manifest(world_size), root / MANIFEST_FILE)
        except OSError as exc:
            raise UsageError(f"cannot write {root / MANIFEST_FILE}: {exc.strerror}") from None
    return rank_dir(root, rank)


def shard_field(shard: Any) -> list[Any]:
    """A ``shard=`` annotation as the record field stores it: ``[rule, dim]``."""
    if isinstance(shard, str):
        shard = (shard, -1 if shard == "col" else 0)
    ok = isinstance(shard, (tuple, list)) and len(shard) == 2 and shard[0] in SHARD_RULES \
        and type(shard[1]) is int
    if not ok:
        raise UsageError(f"shard must be (rule, dim) with rule one of {', '.join(SHARD_RULES)}"
                         f" and dim an int, got {shard!r}")
    return [shard[0], shard[1]]
