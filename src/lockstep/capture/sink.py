"""Where captures go: straight into the dump when that is cheapest, else a writer thread.

A capture of host memory, with statistics left to the reader and nothing queued before it,
is written on the engine's thread at once: one copy, into the OS's page cache (or, under
64 KiB, into the writer's staging buffer: store/writer.py), and nothing left that the engine
could overwrite first. Everything else (a GPU tensor still in flight, statistics to
compute) is copied now (by the recording's copy engine, capture/copies.py: into a pooled
host buffer; a CUDA tensor on a side stream) and queued; one thread waits for each copy to
land, computes its statistics and appends it to the dump, in capture order. Memory held by
queued copies is bounded: a capture waits before it copies while ``max_pending_bytes`` (the
capacity of the buffers held) or ``max_pending_records`` are queued; a single tensor larger
than the bound is let through alone. An error on the writer thread is raised on the
engine's at its next capture, flush or close.
"""

from __future__ import annotations

import queue
import threading
from typing import Any

from ..errors import LockstepError
from ..store.writer import DumpWriter
from .copies import Copies
from .tensors import HostTensor

__all__ = ["Sink"]

_STOP = object()


class Sink:
    """Serialises captures into one DumpWriter."""

    def __init__(self, writer: DumpWriter, *, keep_data: bool = True, keep_stats: bool = False,
                 max_pending_bytes: int = 1 << 30, max_pending_records: int = 4096,
                 copies: str = "auto") -> None:
        self.writer = writer
        self.keep_data = keep_data
        self.keep_stats = keep_stats or not keep_data
        #: captures can be written on the engine's thread, uncopied
        self.direct = keep_data and not self.keep_stats and copies != "queue"
        self._queue: queue.Queue[Any] = queue.Queue()
        # ``_lock`` guards the count of queued items. The DumpWriter is used by one thread at
        # a time without a lock of its own: by the engine's thread only while that count is 0
        # (the writer thread is idle then, and the engine's holds ``_lock`` while it writes),
        # else by the writer thread alone, which holds no lock while it waits for a copy,
        # computes statistics and writes: the engine's thread never waits on a copy or on
        # the disk, only on room in the queue.
        self._lock = threading.Lock()
        self._inflight = 0  # queued and not yet handled
        self._pending = 0  # bytes held by queued copies
        self._records = 0  # queued copies
        self._limit = max_pending_bytes
        self._max_records = max(1, max_pending_records)
        self.peak_pending = 0  #: the most bytes ever held by queued copies at once
        self.peak_records = 0  #: the most copies ever queued at once
        self._room = threading.Condition()
        self.copies = Copies(copies, self._reserve, self._unreserve,
                             keep_bytes=min(max_pending_bytes, 256 << 20))
        self._error: BaseException | None = None
        # started at the first item queued: a recording whose captures are all written at
        # once never starts it
        self._thread: threading.Thread | None = None

    def _raise_if_failed(self) -> None:
        if self._error is not None:
            err, self._error = self._error, None
            if isinstance(err, LockstepError):  # the disk refused: one line, not a bug
                raise err
            raise RuntimeError(f"lockstep could not write the dump: {err}") from err

    @property
    def pending_bytes(self) -> int:
        """Bytes held by queued copies now."""
        return self._pending

    def _reserve(self, size: int) -> None:
        """Wait for room in the queue for ``size`` bytes, then take it."""
        with self._room:
            while (self._pending and self._pending + size > self._limit) \
                    or self._records >= self._max_records:
                self._room.wait()
            self._pending += size
            self._records += 1
            self.peak_pending = max(self.peak_pending, self._pending)
            self.peak_records = max(self.peak_records, self._records)

    def _unreserve(self, size: int) -> None:
        with self._room:
            self._pending -= size
            self._records -= 1
            self._room.notify_all()

    def _settle(self, tensor: HostTensor) -> None:
        """Give back the room a copy held in the queue."""
        if tensor.pending:
            self._unreserve(tensor.pending)
            tensor.pending = 0

    def put(self, name: str, step: int, call: int, tensor: HostTensor, *, alias: bool = False,
            **extra: Any) -> None:
        """Record one captured tensor; ``alias``: a HostTensor already put, recorded again
        under ``name`` pointing at the same data."""
        if self._error is not None:
            try:
                self._raise_if_failed()
            except BaseException:
                if not alias:
                    self._settle(tensor)
                raise
        with self._lock:
            if self._inflight == 0 and (alias or (self.direct and tensor.event is None)):
                self._write(name, step, call, tensor, extra)  # nothing queued: writer idle
                return
            self._inflight += 1
        if not alias and not tensor.pending:
            tensor.own()  # read later: copy now what the engine may overwrite
            self._reserve(tensor.nbytes)
            tensor.pending = tensor.nbytes
        self._enqueue((name, step, call, tensor, extra))

    @property
    def writes_now(self) -> bool:
        """Captures are written on the engine's thread as they come (``direct``), and no
        writer thread was ever started, so nothing is queued ahead of them."""
        return self.direct and self._thread is None

    def write_now(self, name: str, step: int, call: int, dtype: str, shape: tuple[int, ...],
                  data: memoryview, role: str | None, extra: dict[str, Any]) -> int | None:
        """Write uncopied bytes at once (only while ``writes_now``); returns their offset
        (``written`` makes the HostTensor a later alias points at)."""
        if self._error is not None:
            self._raise_if_failed()
        writer = self.writer
        with self._lock:
            writer.write(name, step, dtype, shape, data, None, call=call, role=role, **extra)
        return writer.last_offset

    @staticmethod
    def written(dtype: str, shape: tuple[int, ...], offset: int | None) -> HostTensor:
        """A record ``write_now`` wrote, as the HostTensor an alias of it is put with."""
        return HostTensor(dtype, shape, None, written=(offset, None))

    def _direct_or_queued(self, item: tuple[Any, ...]) -> bool:
        """Handle a control item now if nothing is queued; True when done."""
        with self._lock:
            if self._inflight == 0:
                self._control(item)
                return True
            self._inflight += 1
        self._enqueue(item)
        return False

    def _enqueue(self, item: Any) -> None:
        if self._thread is None:
            with self._lock:
                if self._thread is None:
                    self._thread = threading.Thread(target=self._run, name="lockstep-writer",
                                                    daemon=True)
                    self._thread.start()
        self._queue.put(item)

    def meta(self, **meta: Any) -> None:
        self._direct_or_queued(("meta", meta))

    def flush(self) -> None:
        """Block until everything captured is written and pushed to the OS."""
        done = threading.Event()
        if not self._direct_or_queued(("flush", done)):
            done.wait()
        self._raise_if_failed()

    def close(self, error: str | None = None) -> None:
        """Drain the queue, write the end line and stop the thread."""
        if self._thread is not None:
            self._queue.put(_STOP)
            self._thread.join()
        self.copies.close()
        self.writer.close(error=error)
        self._raise_if_failed()

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            if item is _STOP:
                return
            try:
                if len(item) == 2:
                    self._control(item)
                else:
                    self._write(*item)
            except BaseException as exc:  # reported on the engine's thread at the next call
                if self._error is None:  # (the first: later ones follow from it)
                    self._error = exc
                if len(item) == 2 and item[0] == "flush":
                    item[1].set()
            finally:
                with self._lock:
                    self._inflight -= 1

    def _control(self, item: tuple[Any, ...]) -> None:
        kind, arg = item
        if kind == "flush":
            self.writer.flush()
            arg.set()
        else:
            self.writer.add_meta(**arg)

    def _write(self, name: str, step: int, call: int, tensor: HostTensor,
               extra: dict[str, Any]) -> None:
        if tensor.written is not None:  # the same tensor under another name: point at it
            offset, kept = tensor.written
            self.writer.write(name, step, tensor.dtype, tensor.shape, None, kept, call=call,
                              at=offset, **extra)
            return
        try:  # (waits for a copy to land: on the writer thread, holding no lock)
            stats = tensor.stats() if self.keep_stats else None
            data = tensor.buffer() if self.keep_data else None
            self.writer.write(name, step, tensor.dtype, tensor.shape, data, stats, call=call,
                              **extra)
            tensor.release(self.writer.last_offset, stats)
        finally:
            if tensor.pending:
                self._settle(tensor)
