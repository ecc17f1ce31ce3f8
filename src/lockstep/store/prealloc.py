"""Reserving a dump's disk blocks ahead of its writes, where that makes them cheaper.

On ext4 and XFS a buffered write past the end of a file allocates blocks (a delayed
allocation reserved page by page); writing into blocks reserved ahead with ``fallocate``
skips that, and the copy into the page cache costs about a fifth less (the recording's
``benchmarks/capture_overhead.py``: docs/format.md, "Preallocated blocks"). The blocks are
reserved with ``FALLOC_FL_KEEP_SIZE``: the file's size stays the end of the data written,
so a dump whose writer was killed has no trailing zeros, and ``release`` (at close) gives
back the blocks reserved past that end.

Only where it was measured to help: on tmpfs ``fallocate`` zeroes memory pages and makes
writes slower, and some file systems lack it (glibc's ``posix_fallocate`` would then write
zeros, doubling the cost), so anywhere else, or off Linux, nothing is reserved.
"""

from __future__ import annotations

import ctypes
import os
import sys
from typing import Any

__all__ = ["Preallocator", "preallocator", "ENABLED"]

#: set False to never reserve blocks (benchmarks measure the writes without it)
ENABLED = True

_KEEP_SIZE = 0x01  # FALLOC_FL_KEEP_SIZE
_FILE_SYSTEMS = {0xEF53: "ext4", 0x58465342: "xfs"}  # statfs f_type -> name
_CHUNK = 16 << 20  # the least reserved at a time
_MAX_CHUNK = 256 << 20  # the most (large dumps reserve an eighth of what they hold)

_libc: Any = None


def _c() -> Any:
    """libc's fstatfs and fallocate, or None where they are not to be used."""
    global _libc
    if _libc is None:
        _libc = False
        if sys.platform.startswith("linux") and ctypes.sizeof(ctypes.c_long) == 8:
            try:
                lib = ctypes.CDLL(None, use_errno=True)
                lib.fallocate64.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64,
                                            ctypes.c_int64]
                lib.fstatfs.argtypes = [ctypes.c_int, ctypes.c_void_p]
                _libc = lib
            except (OSError, AttributeError):
                pass
    return _libc or None


def file_system(fd: int) -> str | None:
    """The name of the file system ``fd`` lies on, if it is one that blocks are reserved on."""
    lib = _c()
    if lib is None:
        return None
    buf = ctypes.create_string_buffer(256)  # struct statfs (120 bytes on 64-bit Linux)
    if lib.fstatfs(fd, buf) != 0:
        return None
    f_type = ctypes.c_long.from_buffer(buf).value & 0xFFFFFFFF  # the struct's first field
    return _FILE_SYSTEMS.get(f_type)


class Preallocator:
    """Keeps blocks reserved ahead of a file's end of data; one per open data file."""

    def __init__(self, fd: int, lib: Any) -> None:
        self.fd = fd
        self._lib = lib
        self.reserved = 0  #: the end of the blocks reserved so far
        self.failed = False  #: the file system refused once: nothing more is reserved

    def ahead(self, end: int) -> None:
        """Make sure blocks are reserved up to ``end`` (and a chunk beyond)."""
        if end <= self.reserved or self.failed:
            return
        size = max(end - self.reserved, min(_MAX_CHUNK, max(_CHUNK, self.reserved // 8)))
        if self._lib.fallocate64(self.fd, _KEEP_SIZE, self.reserved, size) != 0:
            # (a full disk, a quota: the write itself says so, or fits where this did not)
            self.failed = True
            return
        self.reserved += size

    def release(self, end: int) -> None:
        """Give back the blocks reserved past ``end``, the end of the data (at close)."""
        if self.reserved > end:
            try:
                os.ftruncate(self.fd, end)
            except OSError:
                pass
            self.reserved = end


def preallocator(fd: int) -> Preallocator | None:
    """A Preallocator for the data file ``fd``, or None where reserving blocks does not
    help (or cannot be done)."""
    if not ENABLED or file_system(fd) is None:
        return None
    return Preallocator(fd, _c())
