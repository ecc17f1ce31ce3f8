"""PyTorch ``.bin``/``.pt`` state dicts, loaded only with ``weights_only=True, mmap=True``."""

from __future__ import annotations

from functools import partial
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from ..errors import MissingExtraError
from ..store.dtypes import to_float
from .tensors import CheckpointError, TensorSource

__all__ = ["TorchFile"]

_AS_UINT = {"bfloat16": "int16", "float8_e4m3fn": "uint8", "float8_e5m2": "uint8"}


def _flatten(obj: Any, prefix: str, out: dict[str, Any], torch: Any) -> None:
    if isinstance(obj, torch.Tensor):
        out[prefix] = obj
    elif isinstance(obj, dict):
        for key, value in obj.items():
            _flatten(value, f"{prefix}.{key}" if prefix else str(key), out, torch)
    elif isinstance(obj, (list, tuple)):
        for i, value in enumerate(obj):
            _flatten(value, f"{prefix}.{i}" if prefix else str(i), out, torch)


class TorchFile:
    """One torch.save file; ``tensors()`` yields every tensor in it (nested dicts flattened)."""

    def __init__(self, path: str | Path) -> None:
        try:
            import torch
        except ImportError:
            raise MissingExtraError("torch", "torch") from None
        self.path = Path(path)
        self.metadata: dict[str, Any] = {}
        self._torch = torch
        try:
            obj = torch.load(self.path, map_location="cpu", weights_only=True, mmap=True)
        except Exception as exc:  # unpickling errors, zip errors, refused globals
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise CheckpointError(self.path, f"cannot load with weights_only=True, "
                                             f"mmap=True: {first}") from None
        self.state: dict[str, Any] = {}
        _flatten(obj, "", self.state, torch)

    def tensors(self) -> Iterator[TensorSource]:
        for name, t in self.state.items():
            dtype = str(t.dtype).removeprefix("torch.")
            yield TensorSource(name, dtype, tuple(t.shape), t.numel() * t.element_size(),
                               partial(self._chunks, t, dtype))

    def _chunks(self, t: Any, dtype: str) -> Iterator[np.ndarray]:
        flat = t.detach().reshape(-1)
        step = 1 << 22
        for lo in range(0, max(flat.numel(), 1), step):
            part = flat[lo:lo + step]
            if dtype in _AS_UINT:
                raw = part.view(getattr(self._torch, _AS_UINT[dtype])).numpy()
                raw = raw.view(np.uint16 if dtype == "bfloat16" else np.uint8)
                yield to_float(raw, dtype)
            elif part.is_complex():
                raise CheckpointError(self.path, f"complex dtype {dtype} is not supported")
            else:
                yield to_float(part.numpy(), dtype)
