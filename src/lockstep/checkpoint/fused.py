"""Fused weights: one tensor that stacks several checkpoint tensors by rows.

vLLM and SGLang (and Phi-3's checkpoints) hold ``qkv_proj`` (q, k, v rows stacked, in that
order) and ``gate_up_proj`` (gate rows, then up) where transformers' Llama and Qwen checkpoints
hold the parts. When one side has the fused tensor and the other its parts, the parts are
stacked into one source that pairs with it: row-major, stacking by rows is the parts'
elements one after the other, so it is read one part at a time.
"""

from __future__ import annotations

import itertools
import math
from typing import Iterable, Sequence

import numpy as np

from .tensors import TensorSource
from .weight_names import FUSED

__all__ = ["fuse_parts", "part_errors"]


def _split(key: str) -> tuple[str, str, str] | None:
    """("layers.N.", fused role, ".weight") of a fused canonical key, else None."""
    parts = key.split(".")
    if len(parts) == 4 and parts[0] == "layers" and parts[2] in FUSED:
        return f"layers.{parts[1]}.", parts[2], "." + parts[3]
    return None


def _stack(parts: list[tuple[str, TensorSource]]) -> TensorSource | None:
    srcs = [s for _, s in parts]
    rest = {s.shape[1:] for s in srcs}
    if len(rest) != 1 or any(not s.shape for s in srcs):
        return None  # parts that do not stack by rows
    dtypes = {s.dtype for s in srcs}
    shape = (sum(s.shape[0] for s in srcs), *srcs[0].shape[1:])
    return TensorSource(
        "+".join(s.name for s in srcs), dtypes.pop() if len(dtypes) == 1 else srcs[0].dtype,
        shape, sum(s.nbytes for s in srcs),
        lambda: itertools.chain.from_iterable(s.chunks() for s in srcs))


def fuse_parts(sources: dict[str, TensorSource], wanted: Iterable[str]
               ) -> dict[str, list[tuple[str, TensorSource]]]:
    """For each fused key in ``wanted`` that ``sources`` lacks but holds every part of, put
    the stacked parts into ``sources`` under that key and drop the parts; returns
    {fused key: [(part key, part source), ...]} for what was stacked."""
    done: dict[str, list[tuple[str, TensorSource]]] = {}
    for key in wanted:
        split = _split(key)
        if split is None or key in sources:
            continue
        prefix, fused, suffix = split
        keys = [prefix + part + suffix for part in FUSED[fused]]
        if not all(k in sources for k in keys):
            continue
        parts = [(k, sources[k]) for k in keys]
        stacked = _stack(parts)
        if stacked is None:
            continue
        for k in keys:
            del sources[k]
        sources[key] = stacked
        done[key] = parts
    return done


def part_errors(x: np.ndarray, b: np.ndarray, parts: Sequence[tuple[str, TensorSource]]
                ) -> list[tuple[str, float]]:
    """(part's tensor name, relative L2 error) of each part's rows of ``x`` against ``b``."""
    out, start = [], 0
    for _, src in parts:
        rows = src.shape[0]
        xs, bs = x[start:start + rows].astype(np.float64), b[start:start + rows].astype(
            np.float64)
        norm = float(np.linalg.norm(bs))
        diff = float(np.linalg.norm(xs - bs))
        out.append((src.name, diff / norm if norm else (0.0 if diff == 0 else math.inf)))
        start += rows
    return out
