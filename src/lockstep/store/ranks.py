"""Multi-rank recordings: one dump per rank of a torch.distributed run (docs/format.md "Ranks").

A directory ``run/`` holding ``ranks.json`` (``{"format": "lockstep-ranks", "version": 1,
"world_size": N}``, written by rank 0 when the recording starts) and one ordinary dump per
rank, ``run/rank0``, ``run/rank1``, ... Each rank's dump is crash-safe on its own; the manifest
says how many there must be, so a rank that never wrote is noticed.
"""

from __future__ import annotations

import os
from pathlib import Path

from ..errors import DumpError
from ..jsontext import JSONTextError, loads
from .rank_paths import MANIFEST_FILE, MANIFEST_FORMAT, MAX_RANKS, is_ranked, manifest, rank_dir
from .reader import Dump, open_dump

__all__ = ["MANIFEST_FILE", "MANIFEST_FORMAT", "rank_dir", "is_ranked", "manifest",
           "open_ranks"]


def _world_size(path: Path) -> int:
    file = path / MANIFEST_FILE
    try:
        obj = loads(file.read_bytes())
    except (OSError, JSONTextError) as exc:
        raise DumpError(file, f"cannot read the ranks manifest: {exc}") from None
    size = obj.get("world_size") if isinstance(obj, dict) else None
    if not isinstance(obj, dict) or obj.get("format") != MANIFEST_FORMAT or \
            type(size) is not int or not 1 <= size <= MAX_RANKS:
        raise DumpError(file, "not a lockstep ranks manifest (it needs \"format\": "
                        f"\"{MANIFEST_FORMAT}\" and an integer \"world_size\" from 1 to "
                        f"{MAX_RANKS})")
    return size


def open_ranks(path: str | os.PathLike[str]) -> list[Dump]:
    """Every rank's dump of the multi-rank recording at ``path``, in rank order.

    A rank whose dump is missing is a DumpError naming it; so is a rank dump whose meta
    names another rank or world size (a dump copied into the wrong place)."""
    root = Path(path)
    size = _world_size(root)
    dumps: list[Dump] = []
    try:
        for rank in range(size):
            where = rank_dir(root, rank)
            if not where.exists():
                raise DumpError(where, f"rank {rank} of {size} wrote no dump (the manifest "
                                f"says {size} ranks): that rank never started recording, or "
                                "its dump was moved")
            dump = open_dump(where)
            dumps.append(dump)
            said = (dump.meta.get("rank", rank), dump.meta.get("world_size", size))
            if said != (rank, size):
                raise DumpError(where, f"this dump says it is rank {said[0]} of {said[1]}, "
                                f"but it lies where rank {rank} of {size} belongs")
    except BaseException:
        for d in dumps:
            d.close()
        raise
    return dumps
