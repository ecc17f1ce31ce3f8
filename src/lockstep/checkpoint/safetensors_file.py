"""A safetensors reader written from the format itself, streaming through a memory map.

Layout: an 8-byte little-endian header length N, N bytes of JSON (``{name: {"dtype",
"shape", "data_offsets": [begin, end]}, "__metadata__": {str: str}}``), then the data; offsets
are relative to the data's start. Everything is checked before a byte of data is read, and
pages are released (``MADV_DONTNEED``) as the reader moves on, so memory stays bounded
whatever the file's size.

Why not the ``safetensors`` library (``benchmarks/safetensors_reader.py`` prints the
figures): its numpy reader holds a whole tensor and keeps the file's pages (peak RSS 1119 MB
on a 1 GiB file against 82 MB here), cannot read bfloat16 without torch, and its errors name
neither the numbers nor, mostly, the tensor ("invalid shape, data type, or offset for
tensor").
"""

from __future__ import annotations

import math
import mmap
import os
import struct
from functools import partial
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from ..jsontext import JSONTextError, loads
from ..store.dtypes import DTYPES, to_float
from ..store.shapes import shape_problem
from .errors import CheckpointError
from .tensors import TensorSource

__all__ = ["SAFETENSORS_DTYPES", "SafetensorsFile", "CHUNK_ELEMENTS"]

#: safetensors dtype -> lockstep.store.dtypes name (torch's spelling)
SAFETENSORS_DTYPES = {
    "F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16",
    "I64": "int64", "I32": "int32", "I16": "int16", "I8": "int8",
    "U64": "uint64", "U32": "uint32", "U16": "uint16", "U8": "uint8", "BOOL": "bool",
    "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2",
}

MAX_HEADER = 100 << 20  #: the reference implementation refuses headers over 100 MB
CHUNK_ELEMENTS = 1 << 22  #: elements converted at a time (16 MiB of float32)
_PAGE = mmap.PAGESIZE


class SafetensorsFile:
    """One .safetensors file; ``tensors()`` yields a TensorSource per tensor, in file order."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        try:
            self.size = os.path.getsize(self.path)
        except OSError as exc:
            raise CheckpointError(self.path, f"cannot read: {exc.strerror or exc}") from None
        self.metadata: dict[str, str] = {}
        self.entries: list[tuple[str, str, tuple[int, ...], int, int]] = []
        self._parse_header()

    def _fail(self, message: str, tensor: str | None = None) -> CheckpointError:
        return CheckpointError(self.path, message, tensor=tensor)

    def _parse_header(self) -> None:
        if self.size < 8:
            raise self._fail(f"not a safetensors file: {self.size} bytes, shorter than the "
                             "8-byte header length")
        with open(self.path, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            if n > self.size - 8:
                raise self._fail(f"header length {n} runs past the end of the file "
                                 f"({self.size} bytes): truncated or not safetensors")
            if n > MAX_HEADER:
                raise self._fail(f"header length {n} is over the {MAX_HEADER}-byte limit")
            raw = f.read(n)
        try:
            header = loads(raw)
        except JSONTextError as exc:
            raise self._fail(f"corrupt header: {exc}") from None
        if not isinstance(header, dict):
            raise self._fail("corrupt header: the JSON is not an object")
        self.data_start = 8 + n
        data_size = self.size - self.data_start
        meta = header.pop("__metadata__", None) or {}
        if not isinstance(meta, dict):
            raise self._fail("corrupt header: __metadata__ is not an object")
        self.metadata = {str(k): str(v) for k, v in meta.items()}
        for name, info in header.items():
            self.entries.append(self._entry(name, info, data_size))
        self.entries.sort(key=lambda e: e[3])
        end = 0
        for name, _, _, begin, stop in self.entries:
            if begin < end:
                raise self._fail(f"data_offsets [{begin}, {stop}] overlap the previous "
                                 f"tensor's (which ends at {end})", name)
            end = max(end, stop)

    def _entry(self, name: str, info: Any, data_size: int) -> tuple[str, str, tuple[int, ...],
                                                                     int, int]:
        if not isinstance(info, dict):
            raise self._fail("corrupt header: entry is not an object", name)
        dtype = info.get("dtype")
        if not isinstance(dtype, str) or dtype not in SAFETENSORS_DTYPES:
            raise self._fail(f"unknown dtype {str(dtype)[:40]!r} (known: "
                             f"{', '.join(SAFETENSORS_DTYPES)})", name)
        shape = info.get("shape")
        if (not isinstance(shape, list) or len(shape) > 16
                or not all(type(d) is int and d >= 0 for d in shape)):
            raise self._fail(f"absurd shape {str(shape)[:80]}: want up to 16 non-negative "
                             "integers", name)
        problem = shape_problem(shape)
        if problem is not None:
            raise self._fail(problem, name)
        offsets = info.get("data_offsets")
        if (not isinstance(offsets, list) or len(offsets) != 2
                or not all(type(o) is int for o in offsets)):
            raise self._fail(f"corrupt data_offsets {str(offsets)[:80]}", name)
        begin, stop = offsets
        if not 0 <= begin <= stop:
            raise self._fail(f"data_offsets [{begin}, {stop}] are out of order", name)
        need = math.prod(shape) * DTYPES[SAFETENSORS_DTYPES[dtype]].itemsize
        if need != stop - begin:
            if need > data_size:
                raise self._fail(f"absurd shape {shape}: {need} bytes of {dtype}, more than "
                                 f"the file's {data_size} bytes of data", name)
            raise self._fail(f"shape {shape} of {dtype} needs {need} bytes but data_offsets "
                             f"[{begin}, {stop}] hold {stop - begin}", name)
        if stop > data_size:
            raise self._fail(f"data_offsets [{begin}, {stop}] run past the end of the data "
                             f"({data_size} bytes): the file is truncated", name)
        return name, dtype, tuple(shape), begin, stop

    def tensors(self) -> Iterator[TensorSource]:
        for name, dtype, shape, begin, stop in self.entries:
            yield TensorSource(name, dtype, shape, stop - begin,
                               partial(self._chunks, dtype, begin, stop))

    def _chunks(self, dtype: str, begin: int, stop: int) -> Iterator[np.ndarray]:
        kind = DTYPES[SAFETENSORS_DTYPES[dtype]]
        if stop == begin:
            yield np.empty(0, dtype=np.float32)
            return
        start, end = self.data_start + begin, self.data_start + stop
        base = start - start % _PAGE
        with open(self.path, "rb") as f:
            try:
                mm = mmap.mmap(f.fileno(), end - base, access=mmap.ACCESS_READ, offset=base)
            except (OSError, ValueError) as exc:
                raise self._fail(f"cannot map the data: {exc}") from None
        try:
            step = CHUNK_ELEMENTS * kind.itemsize
            released = 0
            for lo in range(start - base, end - base, step):
                hi = min(lo + step, end - base)
                raw = np.frombuffer(mm, dtype=kind.storage, count=(hi - lo) // kind.itemsize,
                                    offset=lo)
                yield to_float(raw, kind.name)
                del raw
                if hasattr(mm, "madvise") and hasattr(mmap, "MADV_DONTNEED"):
                    done = hi - hi % _PAGE
                    if done > released:
                        mm.madvise(mmap.MADV_DONTNEED, released, done - released)
                        released = done
        finally:
            try:
                mm.close()
            except BufferError:  # a caller still holds a view; the GC closes it
                pass
