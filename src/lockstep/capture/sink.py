"""Where captures go: straight into the dump when that is cheapest, else a writer thread.

A capture of host memory, with statistics left to the reader and nothing queued before it,
is written on the engine's thread at once: one copy, into the OS's page cache (or, under
64 KiB, into the writer's staging buffer: store/writer.py), and nothing left that the engine
could overwrite first. Everything else (a GPU tensor still in flight, statistics to
compute) is copied now and queued; one thread waits for each copy to land, computes its
statistics and appends it to the dump, in capture order. Memory held by queued copies is
bounded: a capture waits when more than ``max_pending_bytes`` are still queued.
"""

from __future__ import annotations

import queue
import threading
from typing import Any

from ..errors import LockstepError
from ..store.writer import DumpWriter
from .tensors import HostTensor

__all__ = ["Sink"]

_STOP = object()


class Sink:
    """Serialises captures into one DumpWriter."""

    def __init__(self, writer: DumpWriter, *, keep_data: bool = True, keep_stats: bool = False,
                 max_pending_bytes: int = 1 << 30) -> None:
        self.writer = writer
        self.keep_data = keep_data
        self.keep_stats = keep_stats or not keep_data
        #: captures can be written on the engine's thread, uncopied
        self.direct = keep_data and not self.keep_stats
        self._queue: queue.Queue[Any] = queue.Queue()
        self._lock = threading.Lock()  # one thread at a time in the DumpWriter
        self._inflight = 0  # queued and not yet handled
        self._pending = 0  # bytes held by queued copies
        self._limit = max_pending_bytes
        self._room = threading.Condition()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="lockstep-writer", daemon=True)
        self._thread.start()

    def _raise_if_failed(self) -> None:
        if self._error is not None:
            err, self._error = self._error, None
            if isinstance(err, LockstepError):  # the disk refused: one line, not a bug
                raise err
            raise RuntimeError(f"lockstep could not write the dump: {err}") from err

    def put(self, name: str, step: int, call: int, tensor: HostTensor, *, alias: bool = False,
            **extra: Any) -> None:
        """Record one captured tensor; ``alias``: a HostTensor already put, recorded again
        under ``name`` pointing at the same data."""
        self._raise_if_failed()
        item = (name, step, call, tensor, extra)
        with self._lock:
            if self._inflight == 0 and (alias or (self.direct and tensor.event is None)):
                self._write(item)
                return
            self._inflight += 1
        if not alias:
            tensor.own()  # read later: copy now what the engine may overwrite
            size = tensor.nbytes
            with self._room:
                while self._pending and self._pending + size > self._limit:
                    self._room.wait()
                self._pending += size
            tensor.pending = size
        self._queue.put(item)

    def _direct_or_queued(self, item: tuple[Any, ...]) -> bool:
        """Handle a control item now if nothing is queued; True when done."""
        with self._lock:
            if self._inflight == 0:
                self._control(item)
                return True
            self._inflight += 1
        self._queue.put(item)
        return False

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
        self._queue.put(_STOP)
        self._thread.join()
        self.writer.close(error=error)
        self._raise_if_failed()

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            if item is _STOP:
                return
            try:
                with self._lock:
                    if len(item) == 2:
                        self._control(item)
                    else:
                        self._write(item)
            except BaseException as exc:  # reported on the engine's thread at the next call
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

    def _write(self, item: tuple[Any, ...]) -> None:
        name, step, call, tensor, extra = item
        if tensor.written is not None:  # the same tensor under another name: point at it
            offset, stats = tensor.written
            self.writer.write(name, step, tensor.dtype, tensor.shape, None, stats, call=call,
                              at=offset, **extra)
            return
        try:
            stats = tensor.stats() if self.keep_stats else None
            data = tensor.buffer() if self.keep_data else None
            self.writer.write(name, step, tensor.dtype, tensor.shape, data, stats, call=call,
                              **extra)
            tensor.release(self.writer.last_offset, stats)
        finally:
            if tensor.pending:
                with self._room:
                    self._pending -= tensor.pending
                    tensor.pending = 0
                    self._room.notify_all()
