"""GGUF files through the ``gguf`` package; quantized tensors are dequantized for statistics."""

from __future__ import annotations

from functools import partial
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from ..extras import require
from .errors import CheckpointError
from .tensors import TensorSource

__all__ = ["GGUFFile"]

_ROWS = 1 << 14  #: rows dequantized at a time


class GGUFFile:
    """One .gguf file; ``tensors()`` yields a TensorSource per tensor."""

    def __init__(self, path: str | Path) -> None:
        gguf = require("gguf", "gguf")
        self.path = Path(path)
        self._gguf = gguf
        try:
            self.reader = gguf.GGUFReader(self.path)
        except Exception as exc:  # the reader raises ValueError, KeyError, struct errors...
            raise CheckpointError(self.path, f"not a readable GGUF file: {exc}") from None
        self.metadata: dict[str, Any] = {}
        for name, fld in self.reader.fields.items():
            if name.startswith(("GGUF.", "tokenizer.ggml.")):
                continue
            try:
                value = fld.contents()
            except Exception:
                continue
            if isinstance(value, (str, int, float, bool)):
                self.metadata[name] = value

    def tensors(self) -> Iterator[TensorSource]:
        for t in self.reader.tensors:
            qtype = t.tensor_type
            shape = tuple(int(d) for d in reversed(t.shape))  # GGUF lists ne[0] first
            yield TensorSource(t.name, qtype.name, shape, int(t.n_bytes),
                               partial(self._chunks, t))

    def _chunks(self, t: Any) -> Iterator[np.ndarray]:
        gguf = self._gguf
        qtype = t.tensor_type
        data = t.data
        plain = qtype in (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16,
                          gguf.GGMLQuantizationType.F64)
        if data.size == 0:  # ne[0] = 0: nothing to read (and no row length to reshape by)
            yield np.empty(0, dtype=np.float32)
            return
        rows = data.reshape(-1, data.shape[-1]) if data.ndim > 1 else data.reshape(1, -1)
        for lo in range(0, rows.shape[0], _ROWS):
            part = rows[lo:lo + _ROWS]
            try:
                if plain:
                    out = np.asarray(part, dtype=np.float64 if part.dtype == np.float64
                                     else np.float32)
                elif qtype == gguf.GGMLQuantizationType.BF16:
                    out = (np.asarray(part).view(np.uint16).astype(np.uint32) << 16).view(
                        np.float32)
                else:
                    out = gguf.quants.dequantize(part, qtype).astype(np.float32, copy=False)
            except NotImplementedError:
                raise CheckpointError(self.path, f"cannot dequantize {qtype.name}",
                                      tensor=t.name) from None
            yield out.reshape(-1)
