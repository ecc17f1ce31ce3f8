"""One tensor of a checkpoint: where it is, what it holds, and its statistics."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import numpy as np

from ..store.stats import array_stats

__all__ = ["TensorSource", "TensorReport", "chunked_stats", "scaled_counts", "read_array"]


@dataclass
class TensorSource:
    """A tensor not read yet: ``chunks()`` yields its elements as float arrays, in order
    (or raises UnreadableTensor)."""

    name: str
    dtype: str  #: the file's own spelling (safetensors "BF16", GGUF "Q4_1", torch "bfloat16")
    shape: tuple[int, ...]
    nbytes: int  #: bytes it takes in the file
    chunks: Callable[[], Iterator[np.ndarray]]
    #: each element ``chunks`` yields stands for this many of the tensor's (an expanded,
    #: stride-0 tensor is read once per stored element)
    repeat: int = 1


def read_array(src: TensorSource) -> np.ndarray:
    """The whole tensor as a float array in its shape."""
    parts = list(src.chunks())
    flat = parts[0] if len(parts) == 1 else np.concatenate(parts)
    return flat.reshape(src.shape)


def scaled_counts(stats: dict[str, Any], repeat: int) -> dict[str, Any]:
    """Statistics of a tensor whose every element repeats ``repeat`` times: the counts grow,
    min, max, mean and std stay."""
    if repeat == 1:
        return stats
    return {**stats, **{k: stats[k] * repeat for k in ("nan", "inf", "zero")}}


@dataclass
class TensorReport:
    """A tensor read: its statistics and component."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    component: str
    stats: dict[str, Any] = field(default_factory=dict)
    unreadable: str | None = None  #: why it could not be read (then ``stats`` is empty)
    adapter: str | None = None  #: "lora A" or "lora B" for a LoRA tensor

    @property
    def elements(self) -> int:
        return math.prod(self.shape)

    @property
    def bad(self) -> bool:
        """Any NaN or Inf."""
        return bool(self.stats.get("nan") or self.stats.get("inf"))

    def to_json(self) -> dict[str, Any]:
        out = {"name": self.name, "dtype": self.dtype, "shape": list(self.shape),
               "component": self.component, "bad": self.bad, "stats": self.stats}
        if self.adapter is not None:
            out["adapter"] = self.adapter
        if self.unreadable is not None:
            out["unreadable"] = self.unreadable
        return out


def chunked_stats(chunks: Iterator[np.ndarray]) -> dict[str, Any]:
    """``array_stats`` over a tensor given in pieces; one piece gives array_stats' own result.

    Pieces are merged exactly for counts, min and max, and by Chan's pairwise formula for the
    mean and variance (over the finite elements, as array_stats has them).
    """
    first: dict[str, Any] | None = None
    merged: dict[str, Any] | None = None
    n_fin = 0
    mean = m2 = 0.0
    for piece in chunks:
        s = array_stats(piece)
        if first is None:
            first = s
        elif merged is None:
            merged = dict(first)
        fin = piece.size - s["nan"] - s["inf"]
        if merged is not None:
            for key in ("nan", "inf", "zero"):
                merged[key] += s[key]
            for key, pick in (("min", min), ("max", max)):
                if s[key] is not None:
                    merged[key] = s[key] if merged[key] is None else pick(merged[key], s[key])
        if fin and s["mean"] is not None and s["std"] is not None:
            delta = s["mean"] - mean
            total = n_fin + fin
            m2 += s["std"] ** 2 * fin + delta * delta * n_fin * fin / total
            mean += delta * fin / total
            n_fin = total
    if first is None:
        return array_stats(np.empty(0, dtype=np.float32))
    if merged is None:
        return first
    if n_fin:
        merged["mean"], merged["std"] = mean, math.sqrt(max(m2 / n_fin, 0.0))
        merged["abs_max"] = max(abs(merged["min"]), abs(merged["max"]))
    return merged
