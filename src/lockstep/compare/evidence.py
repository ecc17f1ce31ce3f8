"""Evidence for a diagnosis: small tests on a pair's tensors, arrays in, numbers out.

Each test is pure numpy and takes a few passes over the tensors it is given; none reads a
dump. The diagnosis (``compare.diagnosis``) picks the tests, feeds them the tensors and
says what the numbers mean.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from ..align.layouts import reorderings
from ..align.transforms import apply_transform
from ..align.transforms import squeeze as squeeze_dims
from ..errors import LockstepError

__all__ = ["squeeze", "rel_error", "NonFinite", "nonfinite", "ValueRange", "value_range",
           "zeroed", "fit_scale", "confined", "LayoutFix", "find_layout", "BlockScales",
           "block_scales", "block_rms_ratio", "rotation", "rotate", "rope_angles",
           "rope_base", "table_base", "match_row", "index_errors", "argmax_tail", "IdDiff",
           "describe_ids", "spaced_rows"]

#: layouts are searched only on tensors up to this many elements (the search copies them)
LAYOUT_MAX_ELEMENTS = 1 << 24


def squeeze(a: np.ndarray) -> np.ndarray:
    """``a`` as float64 without its size-1 dims."""
    return squeeze_dims(np.asarray(a, dtype=np.float64))


def spaced_rows(total: int, most: int) -> np.ndarray:
    """At most ``most`` row indices of ``total``, evenly spaced, the first and last among
    them: the rows a re-enactment reads of a long prefill."""
    return np.unique(np.linspace(0, total - 1, min(total, most)).round().astype(int))


def rel_error(ref: np.ndarray, cand: np.ndarray) -> float:
    """``‖cand − ref‖ / ‖ref‖`` over the elements finite on both sides (inf if sizes differ)."""
    r = np.asarray(ref, dtype=np.float64).reshape(-1)
    c = np.asarray(cand, dtype=np.float64).reshape(-1)
    if r.size != c.size:
        return math.inf
    ok = np.isfinite(r) & np.isfinite(c)
    if not ok.all():
        r, c = r[ok], c[ok]
    err = float(np.linalg.norm(c - r))
    if err == 0.0:
        return 0.0
    scale = float(np.linalg.norm(r))
    return err / scale if scale > 0 else math.inf


@dataclass(frozen=True)
class NonFinite:
    """Where a tensor holds NaN or Inf."""

    nan: int
    inf: int
    numel: int
    rows: tuple[int, ...]  #: indices along the first (squeezed) dim that hold any, at most 8
    row_count: int  #: how many indices along the first dim hold any
    row_total: int  #: the first dim's size

    @property
    def count(self) -> int:
        return self.nan + self.inf

    @property
    def fraction(self) -> float:
        return self.count / self.numel if self.numel else 0.0


def nonfinite(a: np.ndarray) -> NonFinite:
    """NaN and Inf counts, and which rows (first squeezed dim) hold them."""
    s = squeeze(a)
    bad = ~np.isfinite(s)
    rows = bad.reshape(s.shape[0], -1).any(axis=1) if s.ndim else bad.reshape(1)
    hit = np.flatnonzero(rows)
    return NonFinite(int(np.isnan(s).sum()), int(np.isinf(s).sum()), int(s.size),
                     tuple(int(i) for i in hit[:8]), int(hit.size), int(rows.size))


@dataclass(frozen=True)
class ValueRange:
    """The finite values' range of one tensor."""

    min: float
    max: float
    abs_max: float
    nonfinite: int
    zero: bool  #: every element is exactly zero


def value_range(a: np.ndarray) -> ValueRange:
    """Smallest, largest and largest absolute finite value, NaN/Inf count, all-zero."""
    f = np.asarray(a, dtype=np.float64).reshape(-1)
    fin = f[np.isfinite(f)]
    if not fin.size:
        return ValueRange(math.nan, math.nan, math.nan, int(f.size), False)
    return ValueRange(float(fin.min()), float(fin.max()), float(np.abs(fin).max()),
                      int(f.size - fin.size), bool(fin.size == f.size and not fin.any()))


def zeroed(ref: np.ndarray, cand: np.ndarray) -> tuple[int, int]:
    """(elements exactly zero in the candidate but not in the reference, reference non-zeros)."""
    r = np.asarray(ref).reshape(-1)
    c = np.asarray(cand).reshape(-1)
    nz = (r != 0) & np.isfinite(r)
    return int(((c == 0) & nz).sum()), int(nz.sum())


def fit_scale(ref: np.ndarray, cand: np.ndarray) -> tuple[float, float]:
    """(s, residual): the one factor with cand ≈ s·ref, and ``‖cand − s·ref‖ / ‖ref‖``."""
    r = np.asarray(ref, dtype=np.float64).reshape(-1)
    c = np.asarray(cand, dtype=np.float64).reshape(-1)
    den = float(np.dot(r, r))
    if den == 0.0 or not math.isfinite(den):
        return math.nan, math.inf
    s = float(np.dot(r, c)) / den
    return s, float(np.linalg.norm(c - s * r)) / math.sqrt(den)


def confined(ref: np.ndarray, cand: np.ndarray, threshold: float
             ) -> tuple[int, tuple[tuple[int, tuple[int, ...]], ...]]:
    """(elements that differ by more than ``threshold``·rms(ref), and for each squeezed axis
    where those lie in a few indices only (at most 8, a quarter of the axis): (axis, indices))."""
    r, c = squeeze(ref), squeeze(cand)
    rms = float(np.sqrt(np.mean(r * r))) if r.size else 0.0
    diff = np.abs(c - r) > threshold * max(rms, 1e-30)
    count = int(diff.sum())
    out = []
    if count and r.ndim:
        where = np.nonzero(diff)
        for axis, idx in enumerate(where):
            hit = np.unique(idx)
            if r.shape[axis] > 1 and hit.size <= min(8, r.shape[axis] // 4):
                out.append((axis, tuple(int(i) for i in hit)))
    return count, tuple(out)


@dataclass(frozen=True)
class LayoutFix:
    """A transform that brings the candidate's tensor onto the reference's."""

    spec: str  #: in the transform language (align.transforms), applied to the candidate
    error: float  #: relative error once it is applied
    stored: str  #: the order the candidate's elements are in, e.g. "(4 heads, 7, 16 head_dim)"
    expected: str  #: the reference's order


def _dims(labels: Sequence[str]) -> str:
    return "(" + ", ".join(labels) + ")"


def _layout_candidates(shape: tuple[int, ...], head_dim: int | None,
                       heads: Sequence[int]) -> list[tuple[str, str, str]]:
    labels = tuple(str(n) for n in shape)
    splits = [(shape, labels)]
    if head_dim and shape and shape[-1] % head_dim == 0:
        for h in sorted(set(heads)):
            if h > 1 and shape[-1] == h * head_dim:
                splits.append((shape[:-1] + (h, head_dim),
                               labels[:-1] + (f"{h} heads", f"{head_dim} head_dim")))
    out = []
    for dims, names in splits:
        for perm in reorderings(len(dims)):
            stored = tuple(dims[i] for i in perm)
            back = tuple(int(i) for i in np.argsort(perm))
            spec = f"reshape({', '.join(map(str, stored))})|"
            spec += "transpose" if len(dims) == 2 else f"permute({', '.join(map(str, back))})"
            if dims != shape:
                spec += f"|reshape({', '.join(map(str, shape))})"
            out.append((spec, _dims([names[i] for i in perm]), _dims(names)))
    if head_dim and head_dim > 2 and head_dim % 2 == 0 and shape and shape[-1] % head_dim == 0:
        out.append(("rope_interleaved", "interleaved RoPE order (pairs 2i, 2i+1)",
                    "half-split RoPE order (pairs i, i+head_dim/2)"))
        out.append(("rope_halfsplit", "half-split RoPE order (pairs i, i+head_dim/2)",
                    "interleaved RoPE order (pairs 2i, 2i+1)"))
    return out


def find_layout(ref: np.ndarray, cand: np.ndarray, head_dim: int | None, heads: Sequence[int],
                good: float) -> LayoutFix | None:
    """The transpose, permutation or RoPE reordering of the candidate that matches the
    reference to within ``good`` (the best one), or None.

    Tried on the squeezed shape, and with its last dim split into (heads, head_dim) for each
    head count given: every reordering of up to four dims, and the RoPE pair orders.
    """
    r, c = squeeze(ref), squeeze(cand)
    if r.shape != c.shape or r.size > LAYOUT_MAX_ELEMENTS or r.size < 4:
        return None
    meta = {"head_dim": head_dim} if head_dim else {}
    best: LayoutFix | None = None
    for spec, stored, expected in _layout_candidates(r.shape, head_dim, heads):
        try:
            fixed = apply_transform(spec, c, meta)
        except LockstepError:
            continue
        err = rel_error(r, fixed)
        if err <= good and (best is None or err < best.error):
            best = LayoutFix(spec, err, stored, expected)
    return best


@dataclass(frozen=True)
class BlockScales:
    """The candidate as the reference times one factor per block of ``block`` elements."""

    block: int  #: elements per block
    extent: int  #: the elements the reference normalises together (head_dim, or a row)
    blocks: tuple[int, ...]  #: the blocks compared (index among the flattened tensor's blocks)
    scales: tuple[float, ...]  #: cand/ref factor of each
    residual: float  #: ‖cand − factor·ref‖ / ‖ref‖ with one factor per block
    spread: float  #: largest relative difference between factors of blocks in one extent

    @property
    def per_extent(self) -> int:
        """The most blocks of one extent that were compared."""
        groups = [b * self.block // self.extent for b in self.blocks]
        return max((groups.count(g) for g in set(groups)), default=0)


def block_scales(ref: np.ndarray, cand: np.ndarray, extent: int, good: float,
                 sizes: Sequence[int] = (64, 32, 16, 8)) -> BlockScales | None:
    """The block size (below ``extent``, dividing it) for which one factor per block explains
    the candidate to within ``good``, and nearly as well as any size does: the largest whose
    residual is within twice the smallest (a block of b is also one of each divisor of b;
    with noise, a larger block than the true one can still pass ``good``, far worse than
    it); None if none does.

    NaN marks elements not compared (blocks the candidate did not record); blocks holding
    any are left out.
    """
    r = np.asarray(ref, dtype=np.float64).reshape(-1)
    c = np.asarray(cand, dtype=np.float64).reshape(-1)
    if r.size != c.size or extent <= 1 or r.size % extent:
        return None
    fits = [f for f in (_block_fit(r, c, extent, good, b)
                        for b in sorted(sizes, reverse=True)) if f is not None]
    if not fits:
        return None
    best = min(f.residual for f in fits)
    return next(f for f in fits if f.residual <= 2.0 * best)


def _block_fit(r: np.ndarray, c: np.ndarray, extent: int, good: float,
               b: int) -> BlockScales | None:
    """One factor per block of ``b`` of the flat float64 ``r`` and ``c``: its fit, where it
    explains the candidate within ``good``."""
    if b >= extent or extent % b:
        return None
    rb, cb = r.reshape(-1, b), c.reshape(-1, b)
    covered = np.isfinite(rb).all(axis=1) & np.isfinite(cb).all(axis=1)
    if not covered.any():
        return None
    rr, cc = rb[covered], cb[covered]
    den = (rr * rr).sum(axis=1)
    scales = np.where(den > 0, (rr * cc).sum(axis=1) / np.where(den > 0, den, 1.0), 1.0)
    norm = float(np.linalg.norm(rr))
    if norm == 0.0:
        return None
    residual = float(np.linalg.norm(cc - scales[:, None] * rr)) / norm
    if residual > good:
        return None
    ids = np.flatnonzero(covered)
    groups = ids * b // extent
    spread = 0.0
    for g in np.unique(groups):
        s = scales[groups == g]
        if s.size > 1:
            spread = max(spread, float((s.max() - s.min()) / max(np.abs(s).mean(), 1e-30)))
    return BlockScales(b, extent, tuple(int(i) for i in ids),
                       tuple(float(s) for s in scales), residual, spread)


def block_rms_ratio(x: np.ndarray, extent: int, block: int, blocks: Sequence[int],
                    eps: float = 1e-6) -> np.ndarray:
    """For each listed block of the flattened ``x``: rms over its extent / rms over the
    block, the factor an RMSNorm over the block puts on one over the whole extent."""
    f = np.asarray(x, dtype=np.float64).reshape(-1)
    ids = np.asarray(blocks, dtype=np.int64)
    ms_block = np.mean(f.reshape(-1, block) ** 2, axis=1)[ids]
    ms_extent = np.mean(f.reshape(-1, extent) ** 2, axis=1)[ids * block // extent]
    return np.sqrt(ms_extent + eps) / np.sqrt(ms_block + eps)


def _halves(a: np.ndarray, pairing: str) -> tuple[np.ndarray, np.ndarray]:
    if pairing == "halfsplit":
        d = a.shape[-1] // 2
        return a[..., :d], a[..., d:]
    return a[..., 0::2], a[..., 1::2]


def rotation(x: np.ndarray, y: np.ndarray, pairing: str) -> tuple[np.ndarray, float]:
    """(angles, norm residual): how ``y`` rotates each pair of ``x`` (last dim = head_dim;
    pairs "halfsplit" (i, i+D/2) or "interleaved" (2i, 2i+1)).

    ``x`` and ``y`` are (rows, heads, head_dim); the angles (rows, head_dim/2) sum every
    head's rotation; the residual is how far ``y`` is from a pure rotation of ``x``.
    """
    xa, xb = _halves(x, pairing)
    ya, yb = _halves(y, pairing)
    zx, zy = xa + 1j * xb, ya + 1j * yb
    angles = np.angle((zy * np.conj(zx)).sum(axis=-2))
    mx = np.abs(zx)
    residual = float(np.linalg.norm(np.abs(zy) - mx)) / max(float(np.linalg.norm(mx)), 1e-30)
    return angles, residual


def rotate(x: np.ndarray, angles: np.ndarray, pairing: str) -> np.ndarray:
    """``x`` (rows, heads, head_dim) with each pair rotated by ``angles`` (rows, head_dim/2)."""
    xa, xb = _halves(x, pairing)
    cos, sin = np.cos(angles)[:, None, :], np.sin(angles)[:, None, :]
    ya, yb = xa * cos - xb * sin, xb * cos + xa * sin
    if pairing == "halfsplit":
        return np.concatenate([ya, yb], axis=-1)
    return np.stack([ya, yb], axis=-1).reshape(x.shape)


def rope_angles(positions: np.ndarray, base: float, head_dim: int) -> np.ndarray:
    """The rotation angles of standard RoPE: position × base^(−2i/head_dim)."""
    inv = base ** (-np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    return np.outer(np.asarray(positions, dtype=np.float64), inv)


def rope_base(angles_at_1: np.ndarray, head_dim: int) -> float | None:
    """The base that gives these rotation angles at position 1 (median over frequencies)."""
    w = np.asarray(angles_at_1, dtype=np.float64)
    i = np.arange(w.size)
    ok = (i >= 1) & (w > 1e-5) & (w < 3.0)
    if not ok.any():
        return None
    return float(np.median(np.exp(-np.log(w[ok]) * head_dim / (2 * i[ok]))))


def table_base(row1: np.ndarray, kind: str) -> float | None:
    """The RoPE base of a cos or sin table's row for position 1 (its first half)."""
    row = np.asarray(row1, dtype=np.float64).reshape(-1)
    half = row[: row.size // 2]
    angles = np.arccos(np.clip(half, -1, 1)) if kind == "cos" else np.arcsin(np.clip(half, -1, 1))
    return rope_base(angles, row.size)


def match_row(rows: np.ndarray, row: np.ndarray, good: float) -> int | None:
    """The index of the row of ``rows`` (n, d) equal to ``row`` within ``good``, or None."""
    if rows.ndim != 2 or rows.shape[1] != row.size:
        return None
    norms = np.maximum(np.linalg.norm(rows, axis=1), 1e-30)
    errs = np.linalg.norm(rows - row.reshape(1, -1), axis=1) / norms
    best = int(np.argmin(errs))
    return best if errs[best] <= good else None


def index_errors(ref: np.ndarray, cand: np.ndarray, axis: int) -> np.ndarray:
    """The relative error of each index along ``axis`` (of the squeezed arrays)."""
    r = np.moveaxis(squeeze(ref), axis, 0)
    c = np.moveaxis(squeeze(cand), axis, 0)
    r2, c2 = r.reshape(r.shape[0], -1), c.reshape(c.shape[0], -1)
    num = np.linalg.norm(c2 - r2, axis=1)
    den = np.linalg.norm(r2, axis=1)
    return np.where(den > 0, num / np.where(den > 0, den, 1.0), np.where(num > 0, np.inf, 0.0))


def argmax_tail(logits: np.ndarray, tail: float = 0.25) -> tuple[float, tuple[int, ...]]:
    """(fraction of rows whose argmax is in the last ``tail`` of the vocabulary, argmaxes)."""
    s = squeeze(logits)
    rows = s.reshape(-1, s.shape[-1]) if s.ndim else s.reshape(1, 1)
    top = np.argmax(np.where(np.isnan(rows), -np.inf, rows), axis=1)
    vocab = rows.shape[1]
    return float(np.mean(top >= vocab * (1 - tail))), tuple(int(t) for t in top)


@dataclass(frozen=True)
class IdDiff:
    """How two token-id vectors differ."""

    differ: int  #: ids that differ
    numel: int
    arange: bool = False  #: the candidate's ids are 0..T-1: positions fed as token ids
    offset: int | None = None  #: the candidate's ids are the reference's plus this
    shift: int | None = None  #: the candidate's ids are the reference's moved by one place


def describe_ids(ref: np.ndarray, cand: np.ndarray) -> IdDiff:
    """How two token-id vectors differ: count, positions fed as ids, constant offset, shift."""
    r = np.asarray(ref).reshape(-1).astype(np.int64)
    c = np.asarray(cand).reshape(-1).astype(np.int64)
    if r.size != c.size:
        return IdDiff(int(max(r.size, c.size)), int(r.size))
    if np.array_equal(r, c):
        return IdDiff(0, int(r.size))
    d = np.unique(c - r)
    shift = None
    if r.size > 1 and np.array_equal(c[1:], r[:-1]):
        shift = 1
    elif r.size > 1 and np.array_equal(c[:-1], r[1:]):
        shift = -1
    return IdDiff(int((r != c).sum()), int(r.size),
                  bool(r.size > 1 and np.array_equal(c, np.arange(c.size))),
                  int(d[0]) if d.size == 1 else None, shift)
