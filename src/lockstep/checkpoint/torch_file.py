"""PyTorch ``.bin``/``.pt`` state dicts, loaded only with ``weights_only=True, mmap=True``.

What a pickle holds is walked without recursion (a list may contain itself). A tensor that
cannot be read (a sparse or meta-device tensor, a dtype with no float conversion such as
bits8 or float4_e2m1fn_x2) is reported as not readable, and the rest are read. A tensor
expanded from a smaller storage (stride 0: ``torch.zeros(1).expand(2**34)``) is read once
per stored element, with its counts scaled, so the run time follows the file's size, not
the size the tensor claims.
"""

from __future__ import annotations

from functools import partial
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from ..extras import require
from ..store.dtypes import DTYPES, to_float
from .errors import CheckpointError, UnreadableTensor
from .tensors import TensorSource

__all__ = ["TorchFile"]

_AS_UINT = {"bfloat16": "int16", "float8_e4m3fn": "uint8", "float8_e5m2": "uint8"}
_MAX_ITEMS = 1 << 22  #: containers and tensors walked in one pickle, at the most
_STEP = 1 << 22  #: elements converted at a time


def _flatten(obj: Any, torch: Any) -> dict[str, Any]:
    """Every tensor in nested dicts/lists/tuples, by dotted path; a container met again
    (a cycle, or shared) is walked once."""
    out: dict[str, Any] = {}
    seen: set[int] = set()
    stack: list[tuple[str, Any]] = [("", obj)]
    walked = 0
    while stack:
        prefix, item = stack.pop()
        walked += 1
        if walked > _MAX_ITEMS:
            raise ValueError(f"more than {_MAX_ITEMS} objects")
        if isinstance(item, torch.Tensor):
            out[prefix] = item
            continue
        if isinstance(item, dict):
            children = [(str(k), v) for k, v in item.items()]
        elif isinstance(item, (list, tuple)):
            children = [(str(i), v) for i, v in enumerate(item)]
        else:
            continue
        if id(item) in seen:
            continue
        seen.add(id(item))
        stack.extend((f"{prefix}.{k}" if prefix else k, v) for k, v in reversed(children))
    return out


def _stored(t: Any, torch: Any) -> tuple[Any, int, str | None]:
    """(the part of ``t`` its storage really holds, how many times each of its elements
    counts, why ``t`` cannot be read or None)."""
    if t.layout != torch.strided:
        return t, 1, f"a {str(t.layout).removeprefix('torch.')} tensor (only dense tensors " \
                     "are inspected)"
    if t.device.type == "meta":
        return t, 1, "a meta-device tensor holds no data"
    if t.is_complex():
        return t, 1, f"complex dtype {str(t.dtype).removeprefix('torch.')} is not supported"
    base = t
    for dim, (size, stride) in enumerate(zip(t.shape, t.stride())):
        if stride == 0 and size > 1:  # expanded: one stored element stands for ``size``
            base = base.narrow(dim, 0, 1)
    repeat = t.numel() // base.numel() if base.numel() else 1
    try:
        held = t.untyped_storage().nbytes() // max(t.element_size(), 1)
    except Exception:  # a storage without bytes (quantized, a tensor subclass)
        held = base.numel()
    if base.numel() > held:
        return t, 1, f"claims {t.numel():,} elements over a storage of {held:,} (overlapping " \
                     "strides)"
    return base, repeat, None


class TorchFile:
    """One torch.save file; ``tensors()`` yields every tensor in it (nested dicts flattened)."""

    def __init__(self, path: str | Path) -> None:
        torch = require("torch", "torch")
        self.path = Path(path)
        self.metadata: dict[str, Any] = {}
        self._torch = torch
        try:
            obj = torch.load(self.path, map_location="cpu", weights_only=True, mmap=True)
            self.state = _flatten(obj, torch)
        except Exception as exc:  # unpickling errors, zip errors, refused globals
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise CheckpointError(self.path, f"cannot load with weights_only=True, "
                                             f"mmap=True: {first[:300]}") from None

    def tensors(self) -> Iterator[TensorSource]:
        for name, t in self.state.items():
            dtype = str(t.dtype).removeprefix("torch.")
            base, repeat, why = _stored(t, self._torch)
            nbytes = base.numel() * t.element_size() if why is None else 0
            yield TensorSource(name, dtype, tuple(t.shape), nbytes,
                               partial(self._chunks, name, base, dtype, why), repeat=repeat)

    def _chunks(self, name: str, t: Any, dtype: str, why: str | None) -> Iterator[np.ndarray]:
        if why is not None:
            raise UnreadableTensor(self.path, why, tensor=name)
        torch = self._torch
        flat = t.detach().reshape(-1)
        for lo in range(0, max(flat.numel(), 1), _STEP):
            part = flat[lo:lo + _STEP]
            if dtype in _AS_UINT:
                raw = part.view(getattr(torch, _AS_UINT[dtype])).numpy()
                raw = raw.view(np.uint16 if dtype == "bfloat16" else np.uint8)
                yield to_float(raw, dtype)
            elif dtype in DTYPES:
                yield to_float(part.numpy(), dtype)
            else:  # float8 fnuz/e8m0, quantized ints: torch converts; bits8, float4 do not
                try:
                    wide = part.dequantize() if part.is_quantized else part.to(torch.float32)
                    yield wide.numpy()
                except (RuntimeError, NotImplementedError, TypeError) as exc:
                    first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
                    raise UnreadableTensor(self.path, f"dtype {dtype} cannot be converted "
                                                      f"to float ({first[:120]})",
                                           tensor=name) from None
