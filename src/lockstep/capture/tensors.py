"""Turning captured values (torch tensors, numpy arrays, nested outputs) into host bytes.

A captured tensor is copied at once, because engines reuse and modify buffers in place, but
never waited for: a recording's copy engine (capture/copies.py) copies a CUDA tensor into a
pooled pinned host buffer on a side stream with ``non_blocking=True`` and records a CUDA
event; the writer thread waits on that event, so the engine's stream runs on with no
synchronisation per tensor.
"""

from __future__ import annotations

import ctypes
import sys
from dataclasses import dataclass, fields
from typing import Any, Iterator, Protocol

import numpy as np

from ..store.dtypes import DTYPES
from ..store.stats import array_stats

__all__ = ["HostTensor", "CopyEngine", "to_host", "plain_cpu", "leaves", "is_tensor",
           "Unrecordable"]

_NUMPY_NAMES = {
    "float64": "float64", "float32": "float32", "float16": "float16", "int64": "int64",
    "int32": "int32", "int16": "int16", "int8": "int8", "uint8": "uint8", "uint16": "uint16",
    "uint32": "uint32", "uint64": "uint64", "bool": "bool",
}
_NUMPY_BY_DTYPE = {np.dtype(k): v for k, v in _NUMPY_NAMES.items()}


_DTYPE_NAMES: dict[Any, str] = {}  # torch dtype -> its name, for the dtypes a dump stores


class Unrecordable(Exception):
    """A value a dump cannot hold; the message says why (the caller names the record)."""


def _torch() -> Any:
    return sys.modules.get("torch")


def is_tensor(value: Any) -> bool:
    """A torch tensor or a numpy array (without importing torch)."""
    if isinstance(value, np.ndarray):
        return True
    torch = _torch()
    return torch is not None and isinstance(value, torch.Tensor)


@dataclass(slots=True)
class HostTensor:
    """A tensor copied to host memory, possibly still in flight from a GPU."""

    dtype: str  #: torch's spelling of the dtype
    shape: tuple[int, ...]
    host: Any  #: a contiguous CPU torch tensor or numpy array holding the copy
    event: Any = None  #: CUDA event to wait on before reading ``host``
    written: tuple[int | None, dict[str, Any] | None] | None = None  #: (offset, stats) once written

    owned: bool = True  #: ``host`` is our copy (False: it may be the engine's own memory)
    nbytes: int = 0  #: bytes of data
    pending: int = 0  #: bytes counted against the sink's bound while queued
    slab: Any = None  #: the pooled buffer ``host`` lies in, given back to ``pool`` when written
    pool: Any = None

    def own(self) -> None:
        """Make ``host`` our own copy, if it is not yet."""
        if not self.owned:
            self.host = self.host.copy() if isinstance(self.host, np.ndarray) \
                else self.host.clone()
            self.owned = True

    def release(self, offset: int | None, stats: dict[str, Any] | None) -> None:
        """The copy is on disk: free it, keeping where it went for later aliases."""
        self.written = (offset, stats)
        self.host = None
        if self.slab is not None:
            self.pool.give(self.slab)
            self.slab = None

    def ready(self) -> None:
        """Wait until the copy has landed (no-op for CPU tensors)."""
        if self.event is not None:
            self.event.synchronize()
            self.event = None

    def buffer(self) -> memoryview:
        """The raw bytes, in the stored dtype's layout."""
        if self.event is not None:
            self.ready()
        if self.nbytes == 0:  # memoryview cannot cast a view with a 0 in its shape
            return memoryview(b"")
        if isinstance(self.host, np.ndarray):
            return memoryview(np.ascontiguousarray(self.host).data).cast("B")
        return _bytes_at(self.host.data_ptr(), self.nbytes)  # ``host`` keeps them alive

    def stats(self) -> dict[str, Any]:
        """Per-record statistics (store.stats fields), computed on the host copy."""
        self.ready()
        if isinstance(self.host, np.ndarray):
            values = self.host
            if values.dtype not in (np.float32, np.float64):
                values = values.astype(np.float32 if values.dtype.kind == "f" else np.float64)
            return array_stats(values)
        return _torch_stats(self.host)


def _torch_stats(t: Any) -> dict[str, Any]:
    """Stats of a contiguous CPU tensor: float32 values for floats, float64 for the rest.

    Converted with numpy where it can be (exactly as torch converts): torch's own conversion
    of a large tensor runs on an OpenMP team of the writer thread's, beside the engine's.
    """
    torch = _torch()
    dtype = t.dtype
    if dtype in (torch.float32, torch.float64):
        return array_stats(t.numpy())
    if dtype == torch.bfloat16:  # bfloat16 is the top half of a float32
        bits = t.view(torch.int16).numpy().view(np.uint16).astype(np.uint32)
        return array_stats(np.left_shift(bits, 16, out=bits).view(np.float32))
    if dtype == torch.float16:
        return array_stats(t.numpy().astype(np.float32))
    if not t.is_floating_point() and not t.is_complex():
        try:
            return array_stats(t.numpy().astype(np.float64))
        except TypeError:  # an integer type numpy lacks
            pass
    return array_stats(t.to(torch.float32 if t.is_floating_point() else torch.float64).numpy())


def _bytes_at(address: int, nbytes: int) -> memoryview:
    """The ``nbytes`` bytes at ``address`` (a contiguous CPU tensor's memory, whatever its
    dtype), uncopied: a ctypes view costs a tenth of ``.numpy()``. The caller keeps the
    tensor alive while the view is used."""
    kind = _ARRAYS.get(nbytes)
    if kind is None:
        if len(_ARRAYS) >= 4096:  # (a decode loop's growing shapes: kept bounded)
            _ARRAYS.clear()
        kind = _ARRAYS[nbytes] = ctypes.c_ubyte * nbytes
    return memoryview(kind.from_address(address)).cast("B")


_ARRAYS: dict[int, Any] = {}  # nbytes -> the ctypes array type of that many bytes


def plain_cpu(t: Any) -> tuple[str, tuple[int, ...], memoryview] | None:
    """(dtype, shape, its bytes uncopied) of a torch tensor ``to_host`` would hand over as it
    is (on the CPU, dense, contiguous, not lazily negated, of a dtype already seen by
    ``to_host``, not empty), or None: the common capture, written at once with no HostTensor
    (capture/recorder.py). Anything else goes through ``to_host``."""
    if t.is_cpu and t.is_contiguous() and t.layout is _STRIDED:
        dtype = _DTYPE_NAMES.get(t.dtype)
        if dtype is not None and not t.is_neg():
            nbytes = t.nbytes
            if nbytes:
                return dtype, tuple(t.shape), _bytes_at(t.data_ptr(), nbytes)
    return None


_STRIDED: Any = None  # torch.strided, once ``to_host`` has seen a torch tensor


class CopyEngine(Protocol):
    """Copies a strided torch tensor (any device) into host memory: capture/copies.py."""

    def copy(self, t: Any, dtype: str) -> HostTensor: ...


def to_host(value: Any, *, copy: bool = True, engine: CopyEngine | None = None) -> HostTensor:
    """Host memory holding ``value``'s elements, contiguous: a copy made now, or with
    ``copy=False`` possibly the tensor's own memory, for a caller that writes it out before
    the engine goes on (``HostTensor.own`` copies later if needed). ``engine`` makes the
    copies of torch tensors (every one on a device, asynchronous for CUDA; a CPU one when
    ``copy``); without it a device tensor is copied with a blocking copy."""
    if isinstance(value, np.ndarray):
        name = _NUMPY_BY_DTYPE.get(value.dtype)  # (dtype.name is slow: this is per capture)
        if name is None:
            native = value.dtype.newbyteorder("=") if value.dtype.byteorder in "<>" else None
            name = _NUMPY_BY_DTYPE.get(native) if native is not None else None
            if name is None:
                raise Unrecordable(f"numpy dtype {value.dtype} is not one a dump stores "
                                   "(docs/format.md, Dtypes)")
            value = value.astype(native)  # big-endian: stored little-endian, as always
        if not copy:
            host = np.ascontiguousarray(value)
            # a fresh copy is ours; a bounds check (not exact overlap solving) says which
            return HostTensor(name, tuple(value.shape), host,
                              owned=not np.may_share_memory(host, value), nbytes=host.nbytes)
        host = np.array(value, copy=True, order="C")
        return HostTensor(name, tuple(value.shape), host, nbytes=host.nbytes)
    torch = _torch()
    t = value.detach() if value.requires_grad else value
    dtype = _DTYPE_NAMES.get(t.dtype)  # (str(dtype) and t.device are slow: this is per capture)
    if dtype is None:
        global _STRIDED
        _STRIDED = torch.strided
        dtype = str(t.dtype).removeprefix("torch.")
        if dtype not in DTYPES:
            raise Unrecordable(f"dtype {dtype} is not one a dump stores (docs/format.md, "
                               "Dtypes); convert it first, e.g. .float()")
        _DTYPE_NAMES[t.dtype] = dtype
    if t.is_cpu:  # (a meta-device tensor is not)
        if t.layout is not torch.strided:
            t = t.to_dense()
        if t.is_neg():  # a lazily negated view: its memory holds the values unnegated
            t = t.resolve_neg()
        if copy and engine is not None:
            return engine.copy(t, dtype)
        nbytes = t.nbytes
        if t.is_contiguous():  # the tensor's own memory (an empty one is nobody's)
            host, owned = t, nbytes == 0
            if copy and not owned:
                host, owned = t.clone(), True
        else:
            host, owned = t.contiguous(), True
        return HostTensor(dtype, tuple(t.shape), host, owned=owned, nbytes=nbytes)
    if t.is_meta:
        raise Unrecordable("a meta-device tensor has no data")
    if t.layout is not torch.strided:
        t = t.to_dense()
    if t.is_neg():
        t = t.resolve_neg()
    if engine is not None:
        return engine.copy(t, dtype)
    host = t.to("cpu").contiguous()  # a blocking copy
    return HostTensor(dtype, tuple(t.shape), host, nbytes=host.nbytes)


_DEPTH = 16  # containers inside containers followed this deep (a cycle stops there)


def leaves(value: Any, prefix: str = "", depth: int = 0) -> Iterator[tuple[str, Any]]:
    """Every tensor inside an output, with its path: "" for a bare tensor, "0", "1.2", "logits".

    Tuples and lists give their index, dicts (and transformers' ModelOutput) their key,
    dataclass instances their field (SGLang's logits processor returns
    ``LogitsProcessorOutput(next_token_logits=...)``); anything else that is not a tensor
    (a KV cache object, None, an int) is skipped.
    """
    if is_tensor(value):
        yield prefix, value
    elif depth >= _DEPTH:
        return
    elif isinstance(value, (tuple, list)):
        for i, item in enumerate(value):
            yield from leaves(item, f"{prefix}.{i}" if prefix else str(i), depth + 1)
    elif isinstance(value, dict):
        for key, item in value.items():
            if isinstance(key, str):
                yield from leaves(item, f"{prefix}.{key}" if prefix else key, depth + 1)
    elif hasattr(type(value), "__dataclass_fields__") and not isinstance(value, type):
        for f in fields(value):  # (its fields proper: no ClassVar)
            item = getattr(value, f.name, None)
            yield from leaves(item, f"{prefix}.{f.name}" if prefix else f.name, depth + 1)
