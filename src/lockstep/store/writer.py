"""Append-only writer of a dump directory (the format is in docs/format.md).

A record of ``STAGE_LIMIT`` bytes or more goes straight to the OS (one ``writev``, no copy in
user space); a smaller one is copied into a staging buffer that goes out in one ``writev``
when it fills, when a large record follows it, and at every ``flush``: a system call costs
as much as copying tens of kilobytes. On ext4 and XFS the data file's blocks are reserved
ahead of the writes (store/prealloc.py), which makes them cheaper. Index lines are held
until ``flush`` and written after the data they point to, so a process killed at any moment
leaves a dump whose every index line points at bytes the OS has.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from ..errors import DumpWriteError, UsageError
from .claim import DATA_FILE, FORMAT_NAME, INDEX_FILE, claim_dump_dir
from .dtypes import lookup
from .prealloc import preallocator

__all__ = ["DumpWriter", "FORMAT_NAME", "FORMAT_VERSION", "INDEX_FILE", "DATA_FILE",
           "append_meta", "check_name", "check_meta"]

FORMAT_VERSION = 1
#: records smaller than this are staged and written together; larger ones go out alone
STAGE_LIMIT = 64 << 10
_STAGE_SIZE = 1 << 20
_ALIGN = 64  # data offsets are 64-byte aligned, so memory-mapped arrays are aligned too
_ZEROS = bytes(_ALIGN)
_ENCODE = json.JSONEncoder(separators=(",", ":"), allow_nan=False).encode
_TEXT = json.encoder.encode_basestring_ascii  # what _ENCODE does to a str, minus the checks


def check_name(name: Any) -> None:
    """Refuse a record name a dump cannot hold: not a string, or not encodable as UTF-8 (a
    lone surrogate such as ``"\\ud800"``: JSON could escape it, but no reader could print it)."""
    if type(name) is not str:
        raise UsageError(f"a record name must be a string, got {type(name).__name__} "
                         f"{name!r:.80}")
    if not name.isascii():
        try:
            name.encode("utf-8")
        except UnicodeEncodeError as exc:
            raise UsageError(f"cannot record {name!r:.200}: the name holds a lone surrogate "
                             f"({name[exc.start]!r} at {exc.start}), which is not text; "
                             "name it with valid Unicode") from None


def check_meta(meta: dict[str, Any]) -> None:
    try:
        json.dumps(meta, ensure_ascii=False, allow_nan=False).encode("utf-8")
    except UnicodeEncodeError as exc:
        raise UsageError(f"cannot store metadata {sorted(meta)!r:.200}: it holds a lone "
                         f"surrogate (at {exc.start} of its JSON), which is not text") from None
    except (TypeError, ValueError) as exc:
        raise UsageError(f"cannot store metadata {sorted(meta)!r:.200}: {exc}") from None


class DumpWriter:
    """Writes one dump; not thread-safe (the recorder serialises calls)."""

    def __init__(self, path: str | os.PathLike[str], meta: dict[str, Any] | None = None,
                 *, overwrite: bool = False, durable: bool = False) -> None:
        self.path = Path(path)
        # A killed process loses nothing the OS has; fsync at close only guards against the
        # machine itself going down, and costs a disk round trip per dump.
        self.durable = durable
        check_meta(meta or {})
        # created (or an old dump truncated) and locked until close: see store/claim.py
        index_fd, data_fd = claim_dump_dir(self.path, overwrite)
        self._data = os.fdopen(data_fd, "wb", buffering=0)  # straight to the OS
        self._prealloc = preallocator(data_fd)  # blocks reserved ahead (store/prealloc.py)
        self._index = os.fdopen(index_fd, "w", encoding="utf-8", newline="\n")
        self._offset = 0  # where the next record's data goes (staged bytes included)
        self._stage = memoryview(bytearray(_STAGE_SIZE))
        self._staged = 0  # bytes in the stage, not yet handed to the OS
        self._seq = 0
        self._lines: list[str] = []
        self._out = 0  # bytes of data.bin handed to the OS
        self._records = 0  # tensor lines written or held (a refused write drops some)
        # (index in self._lines, end of its data) of held lines whose data may be staged
        self._unsure: list[tuple[int, int]] = []
        self._heads: dict[str, str] = {}  # name -> the start of its tensor lines
        # (dtype, shape) -> its part of the line, and the data's size
        self._forms: dict[tuple[str, tuple[int, ...]], tuple[str, int]] = {}
        self._extras: dict[tuple[str, str], str] = {}  # (field, text) -> ',"field":"text"'
        self._closed = False
        #: the OS refused a write: the file no longer ends where the offsets say, so every
        #: later record is refused too (never written at an offset its data is not at)
        self.refusal: DumpWriteError | None = None
        header = {"type": "header", "format": FORMAT_NAME, "version": FORMAT_VERSION,
                  "meta": meta or {}}
        self._line(header)
        self.flush()

    @property
    def records(self) -> int:
        """How many tensor records have been written."""
        return self._records

    def _line(self, obj: dict[str, Any]) -> None:
        # Held until flush: the index file must never reach the OS ahead of the data it
        # points to, which a buffer filling up on its own would allow.
        self._lines.append(_ENCODE(obj) + "\n")

    def write(self, name: str, step: int, dtype: str, shape: tuple[int, ...],
              data: memoryview | bytes | None, stats: dict[str, Any] | None = None, *,
              call: int = 0, at: int | None = None, role: str | None = None,
              **extra: Any) -> int:
        """Append one tensor record; ``data`` None writes statistics only. Returns its seq.

        ``at`` points the record at data already written at that offset (the same tensor
        recorded under a second name: a parent module returning its child's output)."""
        if self.refusal is not None:
            raise DumpWriteError(f"{self.refusal}; nothing more is recorded after it "
                                 f"({name!r:.200} is not)")
        head = self._heads.get(name)  # (a name in the cache was checked when it went in)
        if head is None:
            check_name(name)
            head = self._heads[name] = f'{{"type":"tensor","name":{_TEXT(name)},"step":'
        form = self._forms.get((dtype, shape if type(shape) is tuple else tuple(shape)))
        if form is None:
            form = self._form(name, dtype, shape)
        nbytes = form[1]
        offset: int | None = None
        if data is not None:
            view = data if type(data) is memoryview else memoryview(data)
            if view.format != "B" or view.ndim != 1:
                # (cast refuses a view with a 0 in its shape: an empty (3, 0) tensor)
                view = view.cast("B") if view.nbytes else memoryview(b"")
            if view.nbytes != nbytes:
                raise ValueError(f"{name}: {view.nbytes} bytes given for {dtype}{list(shape)}")
            pad = -self._offset % _ALIGN
            offset = self._offset + pad
            self._put_data(view, pad, nbytes)
            self._offset = offset + nbytes
        elif at is not None:
            offset = at
        self._lines.append(self._tensor_line(head, step, call, form[0], offset, nbytes, stats,
                                             role, extra))
        if offset is not None and offset + nbytes > self._out:
            self._unsure.append((len(self._lines) - 1, offset + nbytes))
        self._records += 1
        self._seq += 1
        self.last_offset = offset
        return self._seq - 1

    def _form(self, name: str, dtype: str, shape: tuple[int, ...]) -> tuple[str, int]:
        """The part of a tensor line that the dtype and shape give, and the data's size."""
        dt = lookup(dtype)
        if dt is None:
            raise UsageError(f"cannot store dtype {dtype!r} for {name!r}")
        nbytes = dt.itemsize
        for n in shape:
            nbytes *= int(n)
        form = (f',"dtype":{_TEXT(dtype)},"shape":[{",".join(str(int(n)) for n in shape)}],'
                '"offset":', nbytes)
        self._forms[(dtype, tuple(shape))] = form
        return form

    def _tensor_line(self, head: str, step: int, call: int, form: str, offset: int | None,
                     nbytes: int, stats: dict[str, Any] | None, role: str | None,
                     extra: dict[str, Any]) -> str:
        """The line json.dumps would give (same keys, order, separators), built from pieces
        cached per name (``head``) and per dtype and shape (``form``): this runs once per
        captured tensor, on the engine's thread."""
        line = (f'{head}{int(step)},"seq":{self._seq},"call":{int(call)}{form}'
                f'{"null" if offset is None else offset},"nbytes":'
                f'{"null" if offset is None else nbytes},"stats":'
                f'{"null" if stats is None else _ENCODE(stats)}')
        if role is not None:  # (the first field after stats, as when it came in ``extra``)
            line += self._extras.get(("role", role)) or self._extra("role", role)
        for key, value in extra.items():
            if value is not None:
                if type(value) is str:
                    line += self._extras.get((key, value)) or self._extra(key, value)
                else:
                    line += f",{_TEXT(key)}:{_ENCODE(value)}"
        return line + "}\n"

    def _extra(self, key: str, value: str) -> str:
        """A text field's part of the line, ``,"key":"value"``, kept for the next line."""
        part = self._extras[(key, value)] = f",{_TEXT(key)}:{_TEXT(value)}"
        return part

    def _put_data(self, view: memoryview, pad: int, nbytes: int) -> None:
        """Append ``pad`` zero bytes and the data: into the stage, or out with what it holds."""
        staged = self._staged
        if nbytes < STAGE_LIMIT:
            if staged + pad + nbytes > _STAGE_SIZE:
                self._drain()
                staged = 0
            stage = self._stage
            if pad:
                stage[staged:staged + pad] = _ZEROS[:pad]
            stage[staged + pad:staged + pad + nbytes] = view
            self._staged = staged + pad + nbytes
            return
        parts: list[Any] = [self._stage[:staged]] if staged else []
        if pad:
            parts.append(_ZEROS[:pad])
        parts.append(view)
        self._hand_over(parts, staged + pad + nbytes)

    def _drain(self) -> None:
        """Hand the staged bytes to the OS."""
        if self._staged:
            self._hand_over([self._stage[:self._staged]], self._staged)

    def _hand_over(self, parts: list[Any], total: int) -> None:
        """Write the stage (and what follows it); when the OS refuses, the held index lines
        from the first whose data did not all reach it on are dropped."""
        self._staged = 0  # (emptied even when the write fails: never written twice)
        try:
            self._write_all(parts, total)
        except DumpWriteError as exc:
            self.refusal = exc
            cut = next((i for i, end in self._unsure if end > self._out), None)
            if cut is not None:
                self._records -= sum(1 for line in self._lines[cut:]
                                     if line.startswith('{"type":"tensor"'))
                del self._lines[cut:]
            raise
        finally:
            self._unsure.clear()

    def _write_all(self, parts: list[Any], total: int) -> None:
        """One system call for padding and data, however large (a partial write goes on)."""
        fd = self._data.fileno()
        if self._prealloc is not None:
            self._prealloc.ahead(self._out + total)
        try:
            done = os.writev(fd, parts)
            self._out += done
            if done < total:
                rest = b"".join(bytes(memoryview(p).cast("B")) for p in parts)[done:]
                while rest:
                    done = os.write(fd, rest)
                    self._out += done
                    rest = rest[done:]
        except OSError as exc:
            raise self._refused(exc) from None

    def _refused(self, exc: OSError) -> DumpWriteError:
        return DumpWriteError(f"cannot write the dump {self.path}: {exc.strerror or exc}; "
                              "the records written before are kept")

    def add_meta(self, **meta: Any) -> None:
        """Append run metadata; later values win over earlier ones and the header's."""
        check_meta(meta)
        self._line({"type": "meta", "meta": meta})

    def flush(self, *, sync: bool = False) -> None:
        """Push data, then index, to the OS (and to the disk when ``sync``)."""
        try:
            self._drain()
            if sync:
                os.fsync(self._data.fileno())
            self._index.write("".join(self._lines))
            self._lines.clear()
            self._index.flush()
            if sync:
                os.fsync(self._index.fileno())
        except OSError as exc:
            self._lines.clear()
            raise self._refused(exc) from None

    def close(self, error: str | None = None) -> None:
        """Write the end line that marks the dump complete, and close the files.

        ``error`` records that the recorded program raised: the dump is complete (every
        record written was kept) and the report says how the run ended.
        """
        if self._closed:
            return
        self._closed = True
        refused: DumpWriteError | None = None
        earlier = self.refusal  # refused before the close (raised then; said here too)
        if earlier is not None and (error is None or str(earlier) not in error):
            error = str(earlier) if error is None else f"{error}; after {earlier}"
        try:  # the staged records first: the end line counts those that reached the OS
            self._drain()
        except DumpWriteError as exc:
            refused = exc
            error = str(exc) if error is None else f"{error}; then {exc}"
        end: dict[str, Any] = {"type": "end", "records": self._records}
        if error is not None:
            end["error"] = error
        self._line(end)
        try:
            if self._prealloc is not None:  # (before an fsync: the blocks past the data)
                self._prealloc.release(self._out)
            self.flush(sync=self.durable)
            if refused is not None:
                raise refused
        finally:  # the files (and the lock) are released even when the disk refused
            for f in (self._data, self._index):
                try:
                    f.close()
                except OSError:
                    pass


def append_meta(path: str | os.PathLike[str], **meta: Any) -> bool:
    """Add a meta line to a dump whose writer is gone (a crashed process): after its last
    whole line, dropping a torn one; never after an end line. Returns False (and writes
    nothing) when there is no dump with a header there."""
    index = Path(path) / INDEX_FILE
    try:
        f = open(index, "r+b")
    except FileNotFoundError:
        return False
    with f:
        raw = f.read()
        keep = raw.rfind(b"\n") + 1
        if keep == 0:
            return False  # not even the header was written whole
        last = raw[:keep - 1].rsplit(b"\n", 1)[-1]
        if b'"type":"end"' in last:
            return False  # a finished dump is never appended to
        f.seek(keep)
        f.truncate()
        f.write((_ENCODE({"type": "meta", "meta": meta}) + "\n").encode())
    return True
