"""Tensor-parallel shards of a checkpoint's tensors: the layouts that bring a full tensor to
one rank's shard of it, and which shard each of a rank's tensors should hold.

vLLM's and Megatron's column-parallel layers hold rows of a weight, their row-parallel
layers columns; a rank's vocabulary rows may include zero padding (vLLM's
VocabParallelEmbedding); a fused QKV or gate/up layer holds its rank's rows of each part,
stacked. A layout's transform names the shard (``shard 1 of 2 (dim 0)``) and ``shard_of``
reads it back. One rank holds one shard of every sharded weight: ``shard_offsets`` names the
tensors that hold another (checkpoint/weights.py).
"""

from __future__ import annotations

import re
import sys
from collections import Counter
from dataclasses import replace
from typing import Any, Callable, Sequence, TypeVar

import numpy as np

__all__ = ["Layout", "shard_of", "shard_layouts", "shard_offsets", "distributed_rank"]

#: (transform, head dim, function): a way to bring A's tensor to B's layout
Layout = tuple[str, int | None, Callable[[np.ndarray], np.ndarray]]

_SHARD = re.compile(r"shard (\d+) of (\d+) \(dim (\d+)(, each part[^)]*|, padded to \d+)?\)")


def shard_of(transform: str) -> tuple[int, int, int] | None:
    """(index, count, dim) of a shard layout's transform ("shard 1 of 2 (dim 0)"), else
    None."""
    m = _SHARD.fullmatch(transform)
    return (int(m[1]), int(m[2]), int(m[3])) if m else None


def _shard_dim(shape_a: tuple[int, ...], shape_b: tuple[int, ...]
               ) -> tuple[int, int, int] | None:
    """(dim, count, padded size) where B's shape is A's with one dimension divided by
    ``count`` >= 2 (B may be one tensor-parallel rank's shard of A: vLLM's column- and
    row-parallel layers), after A is padded along it with zero rows to a multiple of 64, fewer
    than 256 per rank (a vocabulary padded as vLLM's VocabParallelEmbedding and
    ParallelLMHead hold it, or Megatron's; with ``count`` 1, padding alone)."""
    if len(shape_a) != len(shape_b):
        return None
    differ = [d for d, (a, b) in enumerate(zip(shape_a, shape_b)) if a != b]
    if len(differ) != 1:
        return None
    d = differ[0]
    a, b = shape_a[d], shape_b[d]
    if not b:
        return None
    count = -(-a // b)
    padded = count * b
    pad = padded - a
    return (d, count, padded) if not pad or (padded % 64 == 0 and pad < min(256 * count, a)) \
        else None


def _take_shard(x: np.ndarray, dim: int, index: int, count: int, padded: int) -> np.ndarray:
    """Shard ``index`` of ``count`` along ``dim`` of ``x`` padded with zeros to ``padded``."""
    size = padded // count
    lo, hi = index * size, (index + 1) * size
    piece = x[(slice(None),) * dim + (slice(lo, min(hi, x.shape[dim])),)]
    if piece.shape[dim] == size:
        return piece
    zeros = list(piece.shape)
    zeros[dim] = size - piece.shape[dim]
    return np.concatenate([piece, np.zeros(zeros, dtype=x.dtype)], axis=dim)


def _part_counts(parts: Sequence[int], rows: int) -> tuple[int, int] | None:
    """(count of the first part's shards, count of the others') where one shard of each part,
    stacked, has ``rows`` rows: vLLM's QKV and merged column-parallel layers hold their rank's
    rows of each part (q, k, v; gate, up). Where a rank holds fewer KV heads than the tensor
    parallelism (fewer KV heads than ranks), K and V have fewer shards than Q, each held by
    several ranks: their count divides Q's."""
    first, rest = parts[0], list(parts[1:])
    if not rest or len(set(rest)) != 1:
        return None
    for count in range(2, min(first, 1024) + 1):
        if first % count:
            continue
        left = rows - first // count
        if left <= 0 or left % len(rest):
            continue
        size = left // len(rest)
        if rest[0] % size == 0 and count % (rest[0] // size) == 0:
            return count, rest[0] // size
    return None


def _part_shards(parts: Sequence[int], rows: int, dim: int) -> list[Layout]:
    """Each rank's shard of each part of a fused A along ``dim``, stacked (see
    ``_part_counts``)."""
    found = _part_counts(parts, rows)
    if found is None:
        return []
    count, others = found
    starts = [sum(parts[:j]) for j in range(len(parts))]
    lead = (slice(None),) * dim

    def shard(i: int) -> Callable[[np.ndarray], np.ndarray]:
        held = [i] + [i // (count // others)] * (len(parts) - 1)
        return lambda x: np.concatenate([
            _take_shard(x[(*lead, slice(lo, lo + n))], dim, k, count if j == 0 else others, n)
            for j, (lo, n, k) in enumerate(zip(starts, parts, held))], axis=dim)

    def label(i: int) -> str:
        if others == count:
            return f"shard {i} of {count} (dim {dim}, each part)"
        return (f"shard {i} of {count} (dim {dim}, each part; the others' "
                f"{i // (count // others)} of {others}: KV heads held by {count // others} "
                "ranks)")

    return [(label(i), None, shard(i)) for i in range(count)]


def shard_layouts(shape_a: tuple[int, ...], shape_b: tuple[int, ...],
                   parts: Sequence[int]) -> list[Layout]:
    dim = len(shape_a) - 2  # the parts are stacked by rows (of each expert, for 3-d experts)
    if parts and dim >= 0 and len(shape_a) == len(shape_b) and sum(parts) == shape_a[dim] \
            and all(a == b for d, (a, b) in enumerate(zip(shape_a, shape_b)) if d != dim):
        return _part_shards(parts, shape_b[dim], dim)
    found = _shard_dim(shape_a, shape_b)
    if found is None:
        return []
    d, count, padded = found
    extra = f", padded to {padded}" if padded != shape_a[d] else ""

    def shard(i: int) -> Callable[[np.ndarray], np.ndarray]:
        return lambda x: _take_shard(x, d, i, count, padded)

    if count == 1:
        return [(f"padded to {padded} (dim {d})", None, shard(0))]
    return [(f"shard {i} of {count} (dim {d}{extra})", None, shard(i)) for i in range(count)]


def _held(check: Any) -> tuple[int, int, int] | None:
    """The shard an equal check's tensor holds, from its transform."""
    return shard_of(check.transform) if check.status == "equal" else None


C = TypeVar("C")


def shard_offsets(checks: list[C], shard: tuple[int, int] | None) -> list[C]:
    """``checks`` with each tensor equal to another shard than this rank's made "different".
    One tensor-parallel rank holds one shard of every sharded weight. Its index is ``shard``'s
    rank where the count of shards is its world size (given, or torch.distributed's);
    otherwise the one most of the model's sharded tensors of that count hold: a tensor equal
    to shard 0 where the others hold shard 1 was loaded at the wrong offset (nothing is said
    on a tie, and a rank that holds another rank's shard everywhere can only be told by its
    rank)."""
    held: dict[int, Counter[int]] = {}
    for c in checks:
        found = _held(c)
        if found is not None:
            held.setdefault(found[1], Counter())[found[0]] += 1
    rank: dict[int, tuple[int, str]] = {}
    for count, indices in held.items():
        (top, n), *rest = indices.most_common(2) + [(-1, 0)]
        if shard is not None and shard[1] == count:
            rank[count] = (shard[0], f"this is rank {shard[0]} of {count}")
        elif n > rest[0][1]:
            rank[count] = (top, f"{n} of the model's sharded tensors hold shard {top}")
    out = []
    for c in checks:
        found = _held(c)
        if found is None or found[1] not in rank or rank[found[1]][0] == found[0]:
            out.append(c)
            continue
        index, count, dim = found
        out.append(replace(c, status="different", note=(  # type: ignore[type-var]
            f"holds shard {index} of {count} (dim {dim}) where {rank[count][1]}: loaded at "
            "another rank's offset")))
    return out


def distributed_rank() -> tuple[int, int] | None:
    """(rank, world size) of torch.distributed's default group, when it is initialized."""
    dist = getattr(sys.modules.get("torch"), "distributed", None)
    if dist is None or not dist.is_available() or not dist.is_initialized():
        return None
    return int(dist.get_rank()), int(dist.get_world_size())
