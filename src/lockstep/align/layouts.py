"""Finding the layout transform that makes a candidate tensor comparable with a reference one.

Tried only when the two shapes differ (size-1 dims aside) but the elements could be the
same: a reshape of heads (``(T, H*D)`` vs ``(T, H, D)``), a permutation (``(H, T, D)``), or a
candidate that holds a block of the reference (``block(16, b)`` of the flattened reference).
Equal shapes get no automatic transform: a tensor that matches only after one is evidence of
a layout bug, which is the diagnosis's to say, not the pairing's to hide.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from typing import Callable, Iterator, Sequence

import numpy as np

from ..store.dtypes import FLOAT_KINDS
from ..store.reader import Record
from .transforms import squeeze_shape

__all__ = ["same_kind", "relative_error", "Layout", "layout_candidates", "agreement",
           "squeeze_shape", "reorderings"]

#: cosine similarity at which two tensors are taken to hold the same values (loose enough
#: for bfloat16 and 4-bit quantization, far above what unrelated tensors reach)
AGREE_COSINE = 0.9


def same_kind(a: Record, b: Record) -> bool:
    """Both float, or both not: integer ids and positions never pair with float tensors."""
    return (a.dtype in FLOAT_KINDS) == (b.dtype in FLOAT_KINDS)


def reorderings(ndim: int) -> Iterator[tuple[int, ...]]:
    """Every order of ``ndim`` dims but their own, for 2 to 4 dims (none for more: 5 dims
    have 119, each a copy of the tensor to try)."""
    if 2 <= ndim <= 4:
        yield from (p for p in itertools.permutations(range(ndim)) if p != tuple(range(ndim)))


@dataclass(frozen=True)
class Layout:
    """A way to compare the two tensors: a transform for either side (None: as is)."""

    ref_transform: str | None = None
    cand_transform: str | None = None
    plausible: bool = True  #: the dims line up without looking at values
    convention: bool = False  #: includes a RoPE layout permutation of the head dim
    last_row: bool = False  #: the reference's last row (of one per token): one to one

    @property
    def label(self) -> str | None:
        return self.cand_transform or (f"reference {self.ref_transform}"
                                       if self.ref_transform else None)


def _mergeable(a: Sequence[int], b: Sequence[int]) -> bool:
    """Whether ``a`` and ``b`` split the same elements into runs of consecutive dims that
    multiply to the same sizes (``(7, 4, 16)`` and ``(7, 64)`` do; ``(4, 7, 16)`` does not)."""
    i = j = 0
    pa = pb = 1
    while i < len(a) or j < len(b):
        if pa <= pb and i < len(a):
            pa *= a[i]
            i += 1
        elif j < len(b):
            pb *= b[j]
            j += 1
        else:
            return False
        if max(pa, pb) % min(pa, pb):
            return False  # a dim straddles a boundary of the other shape
        if pa == pb:
            pa = pb = 1
    return pa == pb == 1


def layout_candidates(ref_shape: Sequence[int], cand_shape: Sequence[int]) -> list[Layout]:
    """Transforms that could make the candidate comparable, most natural first; [] when
    nothing can (different element counts that are not a block)."""
    r, c = squeeze_shape(ref_shape), squeeze_shape(cand_shape)
    if r == c:
        return [Layout()]
    nr, nc = math.prod(r), math.prod(c)
    if nr == 0 or nc == 0:  # an empty tensor holds no layout to find
        return []
    out: list[Layout] = []
    if nr == nc:
        target = ", ".join(map(str, r)) or "1"
        if _mergeable(r, c):
            out.append(Layout(cand_transform=f"reshape({target})"))
        for perm in reorderings(len(c)):
            shape = [c[p] for p in perm]
            spec = (f"squeeze|permute({', '.join(map(str, perm))})"
                    + ("" if tuple(shape) == r else f"|reshape({target})"))
            out.append(Layout(cand_transform=spec, plausible=_mergeable(r, shape)))
        return sorted(out, key=lambda lay: not lay.plausible)
    if nc < nr and nr % nc == 0 and len(c) == 1 and len(r) >= 2 and nc == r[-1]:
        # one row of a reference with a row per token: the last token's, whatever the values
        # say (an engine that takes its logits from another token is wrong, not "laid out":
        # matching the row by values would hide that very bug)
        out.append(Layout(ref_transform=f"block({nc}, {nr // nc - 1})", last_row=True))
    elif nc < nr and nr % nc == 0 and len(c) == 1 and nr // nc <= 4096:
        out += [Layout(ref_transform=f"block({nc}, {b})", plausible=False)
                for b in range(nr // nc)]
    return out or _padded(r, c, cand_shape)


def _padded(r: tuple[int, ...], c: tuple[int, ...], cand_shape: Sequence[int]) -> list[Layout]:
    """Where the candidate's last dim is the reference's and fewer than 256 more (and fewer
    than the reference's), a multiple of 64: its first columns, then the
    layouts that fit. A padded vocabulary: an engine that pads its lm_head's rows to a
    multiple of 64 or 128 (vLLM's ParallelLMHead) and records its logits before cutting them
    back. Never plausible on shapes alone: only what the values agree with is taken, and the
    columns past the reference's are not compared."""
    if not (r and c and cand_shape and cand_shape[-1] == c[-1] > r[-1] and c[-1] % 64 == 0
            and c[-1] - r[-1] < min(256, r[-1])):
        return []
    cut = f"slice(-1, 0, {r[-1]})"
    inner = layout_candidates(r, (*c[:-1], r[-1]))
    return [Layout(ref_transform=lay.ref_transform,
                   cand_transform="|".join(filter(None, (cut, lay.cand_transform))),
                   plausible=False) for lay in inner]


#: elements compared at most (an evenly strided sample of larger tensors: pairing needs
#: evidence, not precision)
SAMPLE = 4096


def sample(values: np.ndarray, trim: Callable[[], None] | None = None) -> np.ndarray:
    """An evenly strided sample of at most ``SAMPLE`` elements, in float64.

    Gathered a few elements at a time, with ``trim`` called in between: from a tensor mapped
    from a dump, each element read maps its page (and, on kernels whose page cache holds large
    folios, up to 2 MB around it) into the process, so a sample of a 1 GB logits tensor read
    in one go would map nearly all of it; ``Dump.trim`` lets those pages go again."""
    flat = values.reshape(-1)
    stride = -(-flat.size // SAMPLE)
    picked = flat[::stride]
    if trim is None or flat.nbytes <= _SMALL:
        return picked.astype(np.float64)
    out = np.empty(picked.size, dtype=np.float64)
    for start in range(0, picked.size, _GATHER):
        out[start:start + _GATHER] = picked[start:start + _GATHER]
        trim()
    return out


#: elements gathered between two trims, and the size up to which a tensor's sample is
#: gathered in one go (what it can map is no more than ``Dump.trim`` lets stay resident)
_GATHER = 64
_SMALL = 64 << 20


def agreement(ref: np.ndarray, cand: np.ndarray,
              trim: Callable[[], None] | None = None) -> float:
    """Cosine similarity of two same-sized tensors (flattened); -1 when it cannot be taken."""
    if ref.size != cand.size or ref.size == 0:
        return -1.0
    a, b = sample(ref, trim), sample(cand, trim)
    if not (np.isfinite(a).all() and np.isfinite(b).all()):
        return -1.0
    na, nb = float(np.linalg.norm(a)), float(np.linalg.norm(b))
    if na == 0.0 or nb == 0.0:
        return 1.0 if na == nb else 0.0
    return float(a @ b) / (na * nb)


def relative_error(ref: np.ndarray, cand: np.ndarray,
                   trim: Callable[[], None] | None = None) -> float:
    """Relative L2 error of two same-sized tensors on an evenly strided sample (nan when it
    cannot be taken): unlike the cosine, it tells a tensor from a scaled copy of it."""
    if ref.size != cand.size or ref.size == 0:
        return math.nan
    a, b = sample(ref, trim), sample(cand, trim)
    if not (np.isfinite(a).all() and np.isfinite(b).all()):
        return math.nan
    scale, diff = float(np.linalg.norm(a)), float(np.linalg.norm(a - b))
    return diff / scale if scale else (0.0 if diff == 0.0 else math.inf)
