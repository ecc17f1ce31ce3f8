"""Copy engines: how a captured torch tensor reaches host memory when it is queued.

A queued capture is copied into a buffer from a small pool of reusable host buffers
(``HostPool``; pinned for CUDA), then waits in the sink's queue for the writer thread.

* ``SyncCopies`` copies at once, on the engine's thread (a CPU tensor; any tensor when the
  recording asks for synchronous copies).
* ``StreamCopies`` copies a CUDA tensor on a side stream, with ``non_blocking=True``: the
  side stream first waits for the stream that produced the tensor (``wait_stream``), the
  tensor is marked as used by the side stream (``record_stream``, so the caching allocator
  does not hand its memory to another tensor before the copy ran), and a CUDA event after
  the copy says when it landed. The writer thread waits on that event, never the engine's.

Room in the sink's queue (bytes and records) is reserved before a buffer is taken, so the
memory the copies hold is bounded by the queue's bound: the engine's thread waits there
when the writer is behind. The same pipeline runs on CPU with ``SyncCopies``, which is how
the tests exercise it on machines without a GPU (docs/gpu.md).
"""

from __future__ import annotations

import sys
import threading
from typing import Any, Callable

from ..errors import UsageError
from .tensors import HostTensor

__all__ = ["HostPool", "SyncCopies", "StreamCopies", "Copies", "COPY_MODES", "check_mode"]

#: how a recording copies captures: "auto" (CPU tensors written at once when nothing is
#: queued, CUDA ones on a side stream), "queue" (every torch tensor copied into a pooled
#: buffer and queued: CPU's stand-in for the CUDA path), "sync" (CUDA tensors copied with a
#: blocking copy: the reference the side-stream path must match byte for byte)
COPY_MODES = ("auto", "queue", "sync")

_MIN_CLASS = 4096


def check_mode(mode: str) -> None:
    if mode not in COPY_MODES:
        raise UsageError(f"copies must be one of {', '.join(COPY_MODES)}, not {mode!r:.40}")


def size_class(nbytes: int) -> int:
    """The capacity of the buffer that holds ``nbytes``: a multiple of an eighth of the
    power of two below it (at least 4 KiB in all), so a buffer wastes at most an eighth."""
    if nbytes <= _MIN_CLASS:
        return _MIN_CLASS
    grain = max(512, 1 << (nbytes.bit_length() - 4))
    return -(-nbytes // grain) * grain


class HostPool:
    """Reusable host buffers (flat uint8 tensors), by size class; thread-safe.

    ``take`` on the engine's thread, ``give`` on the writer's. Idle buffers beyond
    ``keep_bytes`` are freed instead of kept."""

    def __init__(self, *, pinned: bool = False, keep_bytes: int = 256 << 20) -> None:
        self.pinned = pinned
        self.keep_bytes = keep_bytes
        self._idle: dict[int, list[Any]] = {}
        self._idle_bytes = 0
        self._lock = threading.Lock()
        self.live = 0  #: bytes of buffers taken and not yet given back
        self.peak_live = 0
        self.made = 0  #: buffers allocated
        self.reused = 0  #: takes served by an idle buffer

    def take(self, nbytes: int) -> Any:
        size = size_class(nbytes)
        with self._lock:
            idle = self._idle.get(size)
            buf = idle.pop() if idle else None
            if buf is not None:
                self._idle_bytes -= size
                self.reused += 1
            self.live += size
            self.peak_live = max(self.peak_live, self.live)
        if buf is None:
            torch = sys.modules["torch"]
            buf = torch.empty(size, dtype=torch.uint8, pin_memory=self.pinned)
            with self._lock:
                self.made += 1
        return buf

    def give(self, buf: Any) -> None:
        size = int(buf.numel())
        with self._lock:
            self.live -= size
            if self._idle_bytes + size <= self.keep_bytes:
                self._idle.setdefault(size, []).append(buf)
                self._idle_bytes += size

    def lost(self, buf: Any) -> None:
        """A buffer that will not come back (its record could not be written)."""
        with self._lock:
            self.live -= int(buf.numel())

    def clear(self) -> None:
        with self._lock:
            self._idle.clear()
            self._idle_bytes = 0


def _nbytes(t: Any) -> int:
    return int(t.numel()) * int(t.element_size())


class SyncCopies:
    """Copies a tensor (any device) into a pooled buffer at once, on the caller's thread."""

    def __init__(self, pool: HostPool, reserve: Callable[[int], None],
                 unreserve: Callable[[int], None]) -> None:
        self.pool = pool
        self._reserve = reserve
        self._unreserve = unreserve

    def copy(self, t: Any, dtype: str) -> HostTensor:
        nbytes = _nbytes(t)
        size = size_class(nbytes)
        self._reserve(size)  # waits while the writer is behind
        try:
            slab = self.pool.take(nbytes)
            try:
                host = slab[:nbytes].view(t.dtype).view(t.shape)
                self._copy_into(host, t)
            except BaseException:
                self.pool.lost(slab)
                raise
        except BaseException:
            self._unreserve(size)
            raise
        out = HostTensor(dtype, tuple(t.shape), host, self._event(), nbytes=nbytes,
                         slab=slab, pool=self.pool)
        out.pending = size
        return out

    def _copy_into(self, host: Any, t: Any) -> None:
        host.copy_(t)

    def _event(self) -> Any:
        return None


class StreamCopies(SyncCopies):
    """Copies a CUDA tensor on a side stream of its device into a pinned pooled buffer."""

    def __init__(self, pool: HostPool, reserve: Callable[[int], None],
                 unreserve: Callable[[int], None]) -> None:
        super().__init__(pool, reserve, unreserve)
        self._streams: dict[int, Any] = {}
        self._last: Any = None  # the event of the copy just issued

    def _copy_into(self, host: Any, t: Any) -> None:
        torch = sys.modules["torch"]
        device = t.device
        side = self._streams.get(device.index)
        if side is None:
            side = self._streams[device.index] = torch.cuda.Stream(device=device)
        side.wait_stream(torch.cuda.current_stream(device))  # after the producing kernels
        with torch.cuda.stream(side):
            host.copy_(t, non_blocking=True)
            event = torch.cuda.Event()
            event.record(side)
        t.record_stream(side)  # its memory is not reused before the copy ran
        self._last = event

    def _event(self) -> Any:
        event, self._last = self._last, None
        return event


class Copies:
    """The copy engine of one recording: routes each tensor by device and mode."""

    def __init__(self, mode: str, reserve: Callable[[int], None],
                 unreserve: Callable[[int], None], keep_bytes: int) -> None:
        check_mode(mode)
        self.mode = mode
        self._args = (reserve, unreserve)
        self._keep = keep_bytes
        self.host = SyncCopies(HostPool(keep_bytes=keep_bytes), reserve, unreserve)
        self._cuda: SyncCopies | None = None

    def copy(self, t: Any, dtype: str) -> HostTensor:
        if not t.is_cuda:
            return self.host.copy(t, dtype)
        if self._cuda is None:
            kind = SyncCopies if self.mode == "sync" else StreamCopies
            self._cuda = kind(HostPool(pinned=True, keep_bytes=self._keep), *self._args)
        return self._cuda.copy(t, dtype)

    @property
    def pools(self) -> list[HostPool]:
        return [c.pool for c in (self.host, self._cuda) if c is not None]

    def close(self) -> None:
        for pool in self.pools:
            pool.clear()
