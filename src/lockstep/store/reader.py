"""Reading a dump: the index into memory, the data memory-mapped and read one tensor at a time.

Everything in a dump is validated before it is used, so a corrupt or hostile dump raises a
``DumpError`` naming the file and the record, never an IndexError or a numpy traceback.
"""

from __future__ import annotations

import math
import mmap
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np

from ..errors import DumpError
from ..jsontext import JSONTextError, loads
from .dtypes import lookup, to_float
from .rank_paths import is_ranked
from .shapes import shape_problem
from .stats import array_stats
from .writer import DATA_FILE, FORMAT_NAME, FORMAT_VERSION, INDEX_FILE

__all__ = ["Record", "Dump", "open_dump", "RESIDENT_BYTES", "trimmer"]

#: data bytes a dump hands out before it drops its mapped pages from the process (Dump.trim)
RESIDENT_BYTES = 256 << 20



@dataclass(frozen=True)
class Record:
    """One captured tensor, as the index describes it."""

    name: str  #: canonical name, e.g. "model.layers.0.mlp" or "model.layers.0:0"
    step: int  #: 0 for prefill (or the first call), then one per decode step
    seq: int  #: capture order in the whole dump
    dtype: str  #: stored dtype, torch's spelling ("bfloat16")
    shape: tuple[int, ...]  #: shape as numpy orders it (row-major)
    call: int = 0  #: the n-th record of this name in this step (a module called twice)
    offset: int | None = None  #: byte offset in data.bin; None in stats-only records
    nbytes: int | None = None  #: bytes in data.bin
    stats: dict[str, Any] | None = None  #: see store.stats.STAT_FIELDS
    extra: dict[str, Any] = field(default_factory=dict)  #: other fields (role, rank, ...)

    @property
    def has_data(self) -> bool:
        return self.offset is not None

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def key(self) -> tuple[int, str, int]:
        return (self.step, self.name, self.call)


def _int(obj: dict[str, Any], key: str, where: str, *, optional: bool = False) -> int | None:
    value = obj.get(key)
    if value is None and optional:
        return None
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise ValueError(f"field {key!r} must be a non-negative integer, got "
                         f"{_brief(value)}{where}")
    return value


def _brief(value: Any, limit: int = 80) -> str:
    """``repr(value)``, cut to ``limit`` characters (values from a hostile file can be huge)."""
    try:
        text = repr(value)
    except ValueError:  # an int too long to print
        return f"<{type(value).__name__} too large to show>"
    return text if len(text) <= limit else text[:limit - 3] + "..."


def _parse_record(obj: dict[str, Any], data_size: int) -> Record:
    name = obj.get("name")
    if not isinstance(name, str) or (not name and name != ""):
        raise ValueError(f"field 'name' must be a string, got {_brief(name)}")
    dtype = obj.get("dtype")
    dt = lookup(dtype) if isinstance(dtype, str) else None
    if dt is None:
        raise ValueError(f"unknown dtype {_brief(dtype)} for {_brief(name)}")
    shape = obj.get("shape")
    if not isinstance(shape, list) or not all(
        isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in shape
    ):
        raise ValueError(f"shape must be a list of non-negative integers, got {_brief(shape)}")
    problem = shape_problem(shape)
    if problem is not None:
        raise ValueError(f"{problem} for {_brief(name)}")
    numel = math.prod(shape)
    step = _int(obj, "step", "")
    seq = _int(obj, "seq", "")
    call = _int(obj, "call", "", optional=True) or 0
    offset = _int(obj, "offset", "", optional=True)
    nbytes = _int(obj, "nbytes", "", optional=True)
    if offset is not None:
        expected = numel * dt.itemsize
        if nbytes != expected:
            raise ValueError(
                f"nbytes {nbytes} does not match {dtype}{shape} ({expected} bytes) for {name!r}"
            )
        if offset + expected > data_size:
            raise ValueError(
                f"data of {name!r} at offset {offset}+{expected} runs past the end of "
                f"{DATA_FILE} ({data_size} bytes): the data file is truncated or the offset wrong"
            )
    rank = obj.get("rank")
    if rank is not None and (not isinstance(rank, int) or isinstance(rank, bool)):
        raise ValueError(f"field 'rank' must be an integer or null, got {_brief(rank)}")
    stats = obj.get("stats")
    if stats is not None and not isinstance(stats, dict):
        raise ValueError(f"stats must be an object or null, got {type(stats).__name__}")
    known = {"type", "name", "step", "seq", "call", "dtype", "shape", "offset", "nbytes", "stats"}
    extra = {k: v for k, v in obj.items() if k not in known}
    assert step is not None and seq is not None
    return Record(name=name, step=step, seq=seq, dtype=dt.name, shape=tuple(shape), call=call,
                  offset=offset, nbytes=nbytes if offset is not None else None, stats=stats,
                  extra=extra)


class Dump:
    """An opened dump. Use ``open_dump``; close it (or use ``with``) to release the mapping."""

    def __init__(self, path: Path, header: dict[str, Any], records: list[Record],
                 meta: dict[str, Any], end: dict[str, Any] | None, data_size: int) -> None:
        self.path = path
        self.header = header
        self.records = records  #: every tensor record, in capture order
        self.meta = meta  #: run metadata: the header's, updated by later meta lines
        self.end = end  #: the end line, or None when the writer never finished
        self._by_key = {r.key: r for r in records}
        self._file = None
        self._map: mmap.mmap | None = None
        self._handed = 0  # bytes of data handed out since the mapping was last trimmed
        if data_size:
            self._file = open(path / DATA_FILE, "rb")
            self._map = mmap.mmap(self._file.fileno(), 0, access=mmap.ACCESS_READ)

    @property
    def complete(self) -> bool:
        """True when the writer closed the dump (it was not killed mid-run)."""
        return self.end is not None

    @property
    def error(self) -> str | None:
        """The exception the recorded program ended with, if it raised."""
        return None if self.end is None else self.end.get("error")

    @property
    def steps(self) -> list[int]:
        return sorted({r.step for r in self.records})

    def get(self, step: int, name: str, call: int = 0) -> Record | None:
        return self._by_key.get((step, name, call))

    def in_step(self, step: int) -> list[Record]:
        return [r for r in self.records if r.step == step]

    def by_seq(self, seq: int) -> Record | None:
        """The record of capture number ``seq`` (a pair's record, whatever step a view of
        the dump numbers it)."""
        return next((r for r in self.records if r.seq == seq), None)

    def raw(self, record: Record) -> np.ndarray:
        """The stored elements, memory-mapped (read-only, no copy)."""
        if record.offset is None:
            raise DumpError(self.path, f"{record.name!r} was recorded as statistics only, "
                            "without data", record=record.seq)
        dt = lookup(record.dtype)
        assert dt is not None
        if record.numel == 0:
            return np.empty(record.shape, dtype=dt.storage)
        assert self._map is not None
        nbytes = record.nbytes or 0
        self._handed += nbytes
        if self._handed > RESIDENT_BYTES:  # a pass over many tensors: keep it bounded
            self.trim()
            self._handed = nbytes
        arr = np.frombuffer(self._map, dtype=dt.storage, count=record.numel, offset=record.offset)
        return arr.reshape(record.shape)

    def trim(self) -> None:
        """Drop every mapped page of the data from this process. The pages stay in the OS's
        page cache, and arrays already handed out stay valid: reading them maps the pages
        again. ``raw`` does this by itself once it has handed out ``RESIDENT_BYTES``, so a
        pass over a dump larger than memory holds about that much of it."""
        if self._map is None:
            return
        try:
            self._map.madvise(mmap.MADV_DONTNEED)
        except (OSError, AttributeError, ValueError):  # a platform without it: keep the pages
            pass
        self._handed = 0

    def release(self, record: Record) -> None:
        """Unmap the pages of ``record``'s data from this process (they stay in the OS's page
        cache, and a later read maps them again): a pass over a dump larger than memory
        keeps only the tensors it is working on resident."""
        if self._map is None or not record.offset or not record.nbytes:
            return
        start = record.offset - record.offset % mmap.PAGESIZE
        try:
            self._map.madvise(mmap.MADV_DONTNEED, start, record.offset + record.nbytes - start)
        except (OSError, AttributeError, ValueError):  # a platform without it: keep the pages
            pass

    def stats(self, record: Record) -> dict[str, Any]:
        """The record's statistics: as stored, or computed from its data when not stored."""
        if record.stats is not None:
            return record.stats
        values = self.read(record)
        if values.dtype not in (np.float32, np.float64):
            values = values.astype(np.float64)
        return array_stats(values)

    def read(self, record: Record) -> np.ndarray:
        """The tensor as float (float64 for float64 and 64-bit ints, else float32)."""
        return to_float(self.raw(record), record.dtype)

    def close(self) -> None:
        if self._map is not None:
            try:
                self._map.close()
            except BufferError:  # an array read from it is still alive: the GC closes it
                pass
            self._map = None
        if self._file is not None:
            self._file.close()
            self._file = None

    def __enter__(self) -> Dump:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __iter__(self) -> Iterator[Record]:
        return iter(self.records)

    def __len__(self) -> int:
        return len(self.records)


def trimmer(*dumps: Dump) -> Callable[[], None]:
    """One call that trims every one of ``dumps`` (what a pass over their tensors gives the
    metrics that read them in pieces)."""
    def trim() -> None:
        for d in dumps:
            d.trim()
    return trim


def open_dump(path: str | os.PathLike[str]) -> Dump:
    """Open a dump directory (or its index.jsonl) for reading; raises DumpError when unreadable."""
    path = Path(path)
    named_index = path.name == INDEX_FILE  # the user named the index itself: a link is fine
    if named_index:
        path = path.parent
    index_path = path / INDEX_FILE
    if not path.exists():
        raise DumpError(path, "no such dump (the directory does not exist)")
    if not index_path.exists() and not index_path.is_symlink():
        if is_ranked(path):
            raise DumpError(path, "a multi-rank recording (one dump per rank): compare "
                            "merges its ranks; for anything else open one rank's dump, "
                            f"{path / 'rank0'}")
        raise DumpError(path, f"not a lockstep dump: {INDEX_FILE} is missing")
    data_path = path / DATA_FILE
    for file in (index_path, data_path):
        if file.is_symlink() and not (named_index and file == index_path):
            raise DumpError(path, f"{file.name} is a symbolic link; lockstep reads only the "
                            "dump's own files (open the link's target itself)")
        if file.exists() and not file.is_file():
            raise DumpError(path, f"{file.name} is not a regular file")
    data_size = data_path.stat().st_size if data_path.exists() else 0
    try:
        text = index_path.read_bytes()
    except OSError as exc:
        raise DumpError(index_path, f"cannot read: {exc.strerror}") from None
    lines = text.split(b"\n")
    # A last line with no newline is a record the writer was killed while writing.
    torn = lines.pop() if lines else b""
    header: dict[str, Any] | None = None
    meta: dict[str, Any] = {}
    records: list[Record] = []
    seen: dict[tuple[int, str, int, Any], int] = {}
    seqs: set[int] = set()
    end: dict[str, Any] | None = None
    for lineno, line in enumerate(lines, start=1):
        where = f"{INDEX_FILE} line {lineno}"
        if not line.strip():
            continue
        if end is not None:
            raise DumpError(path, f"{where}: content after the end line")
        try:
            obj = loads(line)
        except JSONTextError as exc:
            raise DumpError(path, f"{where} is {exc}") from None
        if not isinstance(obj, dict):
            raise DumpError(path, f"{where} is not a JSON object")
        kind = obj.get("type")
        if header is None:
            if kind != "header" or obj.get("format") != FORMAT_NAME:
                raise DumpError(path, f"{where}: not a lockstep dump (no header line)")
            version = obj.get("version")
            if not isinstance(version, int) or isinstance(version, bool) or version < 1:
                raise DumpError(path, f"{where}: the header's version must be a positive "
                                f"integer, got {_brief(version)}")
            if version > FORMAT_VERSION:
                raise DumpError(path, f"dump format version {version} is newer than this "
                                f"lockstep reads ({FORMAT_VERSION}); upgrade lockstep")
            header_meta = obj.get("meta") or {}
            if not isinstance(header_meta, dict):
                raise DumpError(path, f"{where}: the header's 'meta' must be an object")
            header = obj
            meta.update(header_meta)
        elif kind == "tensor":
            try:
                rec = _parse_record(obj, data_size)
            except ValueError as exc:
                seq = obj.get("seq")
                raise DumpError(path, f"{where}: {exc}", record=seq if type(seq) is int and
                                len(str(seq)) < 20 else None) from None
            if rec.seq in seqs:
                raise DumpError(path, f"{where}: seq {rec.seq} is used twice", record=rec.seq)
            seqs.add(rec.seq)
            key = (rec.step, rec.name, rec.call, rec.extra.get("rank"))
            if key in seen:
                raise DumpError(path, f"{where}: {rec.name!r} step {rec.step} call {rec.call} "
                                f"recorded twice (first at line {seen[key]})", record=rec.seq)
            seen[key] = lineno
            records.append(rec)
        elif kind == "meta":
            extra_meta = obj.get("meta")
            if not isinstance(extra_meta, dict):
                raise DumpError(path, f"{where}: a meta line needs an object 'meta'")
            meta.update(extra_meta)
        elif kind == "end":
            end = obj
            count = obj.get("records")
            if count is not None and count != len(records):
                raise DumpError(path, f"{where}: the end line says {_brief(count)} records but the "
                                f"index has {len(records)}; the index is damaged")
        else:
            raise DumpError(path, f"{where}: unknown line type {_brief(kind)}")
    if header is None:
        raise DumpError(path, f"{INDEX_FILE} is empty: the writer died before writing anything")
    if torn.strip() and end is not None:
        raise DumpError(path, f"{INDEX_FILE} has a torn line after the end line")
    records.sort(key=lambda r: r.seq)
    return Dump(path, header, records, meta, end, data_size)
