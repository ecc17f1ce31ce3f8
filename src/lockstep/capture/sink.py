"""The writer thread: statistics and disk writes off the engine's thread.

Captures are queued as host copies; one thread waits for each copy to land, computes its
statistics and appends it to the dump, in capture order. Memory held by queued copies is
bounded: a capture waits when more than ``max_pending_bytes`` are still queued.
"""

from __future__ import annotations

import queue
import threading
from typing import Any

from ..store.writer import DumpWriter
from .tensors import HostTensor

__all__ = ["Sink"]

_STOP = object()


class Sink:
    """Serialises writes to one DumpWriter from a background thread."""

    def __init__(self, writer: DumpWriter, *, keep_data: bool = True, keep_stats: bool = True,
                 max_pending_bytes: int = 1 << 30) -> None:
        self.writer = writer
        self.keep_data = keep_data
        self.keep_stats = keep_stats or not keep_data
        self._queue: queue.Queue[Any] = queue.Queue()
        self._pending = 0
        self._limit = max_pending_bytes
        self._room = threading.Condition()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="lockstep-writer", daemon=True)
        self._thread.start()

    def _raise_if_failed(self) -> None:
        if self._error is not None:
            err, self._error = self._error, None
            raise RuntimeError(f"lockstep could not write the dump: {err}") from err

    def put(self, name: str, step: int, call: int, tensor: HostTensor, *, alias: bool = False,
            **extra: Any) -> None:
        """Queue one captured tensor; ``alias``: a HostTensor already queued, to be recorded
        again under ``name`` pointing at the same data."""
        self._raise_if_failed()
        if alias:
            self._queue.put((name, step, call, tensor, extra))
            return
        size = tensor.nbytes
        with self._room:
            while self._pending and self._pending + size > self._limit:
                self._room.wait()
            self._pending += size
        self._queue.put((name, step, call, tensor, extra))

    def meta(self, **meta: Any) -> None:
        self._queue.put(("meta", meta))

    def flush(self) -> None:
        """Block until everything queued is written and pushed to the OS."""
        done = threading.Event()
        self._queue.put(("flush", done))
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
                self._handle(item)
            except BaseException as exc:  # reported on the engine's thread at the next call
                self._error = exc
                if item[0] == "flush" and len(item) == 2:
                    item[1].set()

    def _handle(self, item: tuple[Any, ...]) -> None:
        if item[0] == "flush" and len(item) == 2:
            self.writer.flush()
            item[1].set()
            return
        if item[0] == "meta" and len(item) == 2:
            self.writer.add_meta(**item[1])
            return
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
            with self._room:
                self._pending -= tensor.nbytes
                self._room.notify_all()
