"""A dump writer that writes every index line and no data: what a dump would weigh.

``capture --dry-run`` records a real pass through it (``lockstep.record(..., data=SIZES)``):
the records, their shapes, dtypes, offsets and the 64-byte padding are those of the real
dump, and the same tensor recorded under two names is counted once, as the real writer
stores it once; only the bytes of ``data.bin`` are counted instead of written.
"""

from __future__ import annotations

from typing import Any

from .writer import DumpWriter

__all__ = ["SIZES", "SizingWriter"]

#: the ``data`` value that records into a SizingWriter
SIZES = "sizes"


class SizingWriter(DumpWriter):
    """Counts the data it is handed; ``data.bin`` stays empty (the dump cannot be read)."""

    def _write_all(self, parts: list[Any], total: int) -> None:
        self._out += total
