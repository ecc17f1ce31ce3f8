"""One checkpoint against another: tensors paired by canonical name, layouts detected, errors
measured after undoing them.

The two may be in different formats (a GGUF file and the transformers model converted from
it, Meta's ``consolidated.pth`` and a transformers directory). For each pair the layout
transform that brings A's tensor into B's layout is found by trying the few that occur in
practice (none, a transpose, the per-head Q/K row order llama.cpp's and Meta's checkpoints
use, both), and the error left after it is compared with what the two dtypes (or GGUF
quantization types) explain. Only one pair of tensors is in memory at a time.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np

from ..atomic import write_json_file
from ..jsontext import json_number
from .errors import CheckpointError, UnreadableTensor
from .fused import fuse_parts, stack_experts
from .paths import read_json
from .shards import Layout, shard_layouts
from .sources import Checkpoint, open_checkpoint
from .tensors import TensorSource, read_array
from .weight_mapping import Rename
from .weight_names import ROPE_ROWS, canonical_weight, role

__all__ = ["Heads", "heads_of", "config_heads", "error_budget", "layouts", "match_layout",
           "pair_errors", "PairResult", "AgainstReport", "against_checkpoints"]

#: progress(done_pairs, total_pairs)
Progress = Callable[[int, int], None]

_CHUNK = 1 << 22  #: elements per piece when measuring errors
_FALLBACK_HEAD_DIMS = (128, 64, 256, 96, 80, 32, 160, 112, 48, 16, 8)

#: relative L2 error each storage type explains (about twice its typical rounding noise on
#: Gaussian weights); a pair's budget is the sum of its two sides'
_BUDGETS = {
    "F64": 1e-12, "F32": 1e-6, "F16": 5e-4, "BF16": 4e-3, "F8_E4M3": 0.07, "F8_E5M2": 0.14,
    "Q8_0": 0.02, "Q8_1": 0.02, "Q8_K": 0.02, "Q6_K": 0.04, "Q5_0": 0.08, "Q5_1": 0.08,
    "Q5_K": 0.08, "Q4_0": 0.15, "Q4_1": 0.15, "Q4_K": 0.15, "IQ4_NL": 0.15, "IQ4_XS": 0.15,
    "MXFP4": 0.15, "Q3_K": 0.3, "Q2_K": 0.6,
}
_TORCH_NAMES = {"float64": "F64", "float32": "F32", "float16": "F16", "bfloat16": "BF16",
                "float8_e4m3fn": "F8_E4M3", "float8_e5m2": "F8_E5M2"}


def error_budget(dtype: str) -> float:
    """The relative L2 error storing a tensor as ``dtype`` explains (0 for integers)."""
    name = _TORCH_NAMES.get(dtype, dtype.upper())
    if name in _BUDGETS:
        return _BUDGETS[name]
    if re.fullmatch(r"(IQ[123]|TQ\d).*", name):  # 1-3 bit and ternary types
        return 0.6
    return 0.3 if name.startswith(("Q", "IQ")) else 0.0


@dataclass(frozen=True)
class Heads:
    """The attention geometry a Q/K row permutation depends on (None: not known)."""

    n_head: int | None = None
    n_kv: int | None = None
    head_dim: int | None = None

    def merged(self, other: Heads) -> Heads:
        """Each field from self if known, else from ``other``."""
        return Heads(self.n_head or other.n_head, self.n_kv or other.n_kv,
                     self.head_dim or other.head_dim)

    def dims(self, op: str, rows: int) -> list[int]:
        """Head sizes to try for the rows of a Q (``op`` "q") or K ("k") weight."""
        known = [self.head_dim or 0]
        count = self.n_head if op == "q" else self.n_kv
        if count and rows % count == 0:
            known.append(rows // count)
        found = [d for d in known if d >= 4 and d % 2 == 0 and rows % d == 0]
        if found:
            return list(dict.fromkeys(found))
        return [d for d in _FALLBACK_HEAD_DIMS if rows % d == 0]

    def to_json(self) -> dict[str, int | None]:
        return {"n_head": self.n_head, "n_kv": self.n_kv, "head_dim": self.head_dim}


def _int(value: Any) -> int | None:
    return value if type(value) is int and value > 0 else None


def config_heads(config: Any) -> Heads:
    """Head counts from a transformers config.json or Meta params.json (as a dict)."""
    if not isinstance(config, dict):
        return Heads()
    if isinstance(config.get("text_config"), dict):  # multimodal wrappers
        config = {**config, **config["text_config"]}
    return Heads(_int(config.get("num_attention_heads") or config.get("n_heads")),
                 _int(config.get("num_key_value_heads") or config.get("n_kv_heads")),
                 _int(config.get("head_dim")))


def heads_of(ckpt: Checkpoint) -> Heads:
    """Head counts from GGUF metadata, or a config.json / params.json beside the weights."""
    meta = ckpt.metadata
    arch = meta.get("general.architecture")
    heads = Heads()
    if isinstance(arch, str):
        heads = Heads(_int(meta.get(f"{arch}.attention.head_count")),
                      _int(meta.get(f"{arch}.attention.head_count_kv")),
                      _int(meta.get(f"{arch}.attention.key_length")))
    folder = ckpt.path if ckpt.path.is_dir() else ckpt.path.parent
    for name in ("config.json", "params.json"):
        if not (folder / name).exists():
            continue
        try:
            config = read_json(folder / name, folder)
        except CheckpointError:  # unreadable: the head counts come from elsewhere
            continue
        heads = heads.merged(config_heads(config))
    return heads


def _rope_rows(x: np.ndarray, d: int, *, to_halves: bool) -> np.ndarray:
    """Reorder the rows of each head of ``d`` rows: llama.cpp's and Meta's order keeps RoPE
    pairs together (row 2i+j of a head is transformers' row j*(d/2)+i)."""
    rest = x.shape[1:]
    split = (x.shape[0] // d, d // 2, 2) if to_halves else (x.shape[0] // d, 2, d // 2)
    return x.reshape(*split, *rest).swapaxes(1, 2).reshape(x.shape)


def _then_rope_rows(fn: Callable[[np.ndarray], np.ndarray], d: int,
                    to_halves: bool) -> Callable[[np.ndarray], np.ndarray]:
    """``fn``, then the RoPE row reordering of heads of ``d`` rows."""
    return lambda x: _rope_rows(fn(x), d, to_halves=to_halves)


def layouts(key: str, shape_a: tuple[int, ...], shape_b: tuple[int, ...],
            heads: Heads, parts: Sequence[int] = ()) -> list[Layout]:
    """(transform, head_dim, function) candidates that give A's tensor B's shape, most
    likely first; empty when no candidate does. Where B's shape is A's with one dimension
    divided, each shard of A along it is a candidate (``parts``: the row counts of the parts
    a fused A stacks, each sharded on its own)."""
    base: list[tuple[str, Callable[[np.ndarray], np.ndarray]]] = []
    if shape_a == shape_b:
        base.append(("", lambda x: x))
    if len(shape_a) == 2 and shape_a[::-1] == shape_b:
        base.append(("transpose", lambda x: x.T))
    if not base and math.prod(shape_a) == math.prod(shape_b):
        base.append(("reshape", lambda x: x.reshape(shape_b)))
    out: list[Layout] = [(name, None, fn) for name, fn in base]
    op = role(key)
    if op in ROPE_ROWS and shape_b:
        for d in heads.dims(op, shape_b[0]):
            for name, fn in base:
                for label, halves in (("rope_unpermute", True), ("rope_permute", False)):
                    out.append(("+".join(filter(None, (name, label))), d,
                                _then_rope_rows(fn, d, halves)))
    return out or shard_layouts(shape_a, shape_b, parts)


def _piece_errors(xs: np.ndarray, bs: np.ndarray) -> tuple[float, float, float]:
    """(max abs, sum of squared errors, sum of squares of B) over one piece."""
    d = xs - bs
    sq, nb = float(np.dot(d, d)), float(np.dot(bs, bs))
    if math.isfinite(sq) and math.isfinite(nb):  # no NaN, no Inf, no float32 overflow
        return (max(float(d.max()), -float(d.min())) if d.size else 0.0), sq, nb
    x64, b64 = xs.astype(np.float64), bs.astype(np.float64)
    d = x64 - b64
    d[(x64 == b64) | (np.isnan(x64) & np.isnan(b64))] = 0.0
    if np.isnan(d).any():
        return math.nan, math.nan, math.nan
    b64 = np.where(np.isfinite(b64), b64, 0.0)
    return float(np.abs(d).max()), float(np.dot(d, d)), float(np.dot(b64, b64))


def pair_errors(x: np.ndarray, b: np.ndarray) -> tuple[float, float]:
    """(max abs error, relative L2 error ||x-b||/||b||); NaN against NaN and equal
    infinities count as equal, any other NaN makes both NaN."""
    xf, bf = x.reshape(-1), b.reshape(-1)
    max_abs = sq = nb = 0.0
    for lo in range(0, xf.size, _CHUNK):
        m, s, n = _piece_errors(xf[lo:lo + _CHUNK], bf[lo:lo + _CHUNK])
        if math.isnan(m):
            return math.nan, math.nan
        max_abs, sq, nb = max(max_abs, m), sq + s, nb + n
    if nb == 0.0:
        return max_abs, 0.0 if sq == 0.0 else math.inf
    return max_abs, math.sqrt(sq / nb)


def match_layout(a: np.ndarray, b: np.ndarray, key: str, heads: Heads,
                 judge: Callable[[np.ndarray, np.ndarray], tuple[bool, float]],
                 parts: Sequence[int] = ()
                 ) -> tuple[str, int | None, np.ndarray, bool] | None:
    """The first layout in which A transformed is good by ``judge(x, b) -> (good, error)``;
    else the one with a clearly smaller error than the first (unrelated values fit every
    layout equally badly): (transform, head_dim, A transformed, good); None when no layout
    gives A's tensor B's shape."""
    first: tuple[float, str, int | None, np.ndarray] | None = None
    best = first
    for name, d, fn in layouts(key, a.shape, b.shape, heads, parts):
        x = fn(a)
        good, err = judge(x, b)
        if good:
            return name, d, x, True
        err = math.inf if math.isnan(err) else err
        if first is None:
            first = best = (err, name, d, x)
        elif best is not None and err < best[0]:
            best = (err, name, d, x)
    if first is None or best is None:
        return None
    pick = best if best[0] < 0.5 * first[0] else first
    return pick[1], pick[2], pick[3], False


@dataclass(frozen=True)
class PairResult:
    """One canonical tensor: its name, type and shape on each side, and how they compare."""

    key: str  #: canonical name (or the tensor's own name when no table knows it)
    name_a: str | None  #: None: only B has it
    name_b: str | None  #: None: only A has it
    dtype_a: str | None  #: storage type: "F32", "BF16", a GGUF quant type ("Q4_1"), ...
    dtype_b: str | None
    shape_a: tuple[int, ...] | None
    shape_b: tuple[int, ...] | None
    #: "ok", "mismatch" (error beyond budget), "shape", "unreadable" (a side's dtype or
    #: layout cannot be read; see ``note``), "missing" (B only), "extra" (A only)
    status: str
    transform: str = ""  #: what brought A into B's layout: "", "transpose", "rope_unpermute", ...
    head_dim: int | None = None  #: for a Q/K row permutation
    tied: bool = False  #: one side has no lm_head; its token embedding stands in
    max_abs: float | None = None
    rel_l2: float | None = None
    budget: float | None = None  #: the relative L2 error the two dtypes explain
    note: str = ""  #: why a tensor is "unreadable"

    @property
    def ok(self) -> bool:
        return self.status == "ok"

    def to_json(self) -> dict[str, Any]:
        return {"key": self.key, "name_a": self.name_a, "name_b": self.name_b,
                "dtype_a": self.dtype_a, "dtype_b": self.dtype_b,
                "shape_a": None if self.shape_a is None else list(self.shape_a),
                "shape_b": None if self.shape_b is None else list(self.shape_b),
                "status": self.status, "transform": self.transform, "head_dim": self.head_dim,
                "tied": self.tied, "max_abs": json_number(self.max_abs),
                "rel_l2": json_number(self.rel_l2),
                "budget": self.budget, **({"note": self.note} if self.note else {})}


@dataclass(frozen=True)
class AgainstReport:
    """Checkpoint A against checkpoint B; truthy when every tensor pairs within budget."""

    path_a: str
    path_b: str
    kind_a: str
    kind_b: str
    heads: Heads
    pairs: tuple[PairResult, ...] = field(default_factory=tuple)

    def __bool__(self) -> bool:
        return all(p.ok for p in self.pairs)

    def with_status(self, *status: str) -> list[PairResult]:
        return [p for p in self.pairs if p.status in status]

    def by_dtype(self) -> list[dict[str, Any]]:
        """One row per (A dtype, B dtype): tensors, failures, largest errors, transforms."""
        rows: dict[tuple[str, str], dict[str, Any]] = {}
        for p in self.pairs:
            if p.name_a is None or p.name_b is None:
                continue
            row = rows.setdefault((p.dtype_a or "", p.dtype_b or ""), {
                "dtype_a": p.dtype_a, "dtype_b": p.dtype_b, "tensors": 0, "failed": 0,
                "max_rel_l2": 0.0, "max_abs": 0.0, "budget": p.budget, "transforms": {}})
            row["tensors"] += 1
            row["failed"] += int(not p.ok)
            for k, v in (("max_rel_l2", p.rel_l2), ("max_abs", p.max_abs)):
                if v is not None and not math.isnan(row[k]) and not v <= row[k]:
                    row[k] = v  # NaN, once there, stays
            name = p.transform or "none"
            row["transforms"][name] = row["transforms"].get(name, 0) + 1
        return sorted(rows.values(), key=lambda r: (-r["tensors"], r["dtype_a"] or ""))

    def to_json(self) -> dict[str, Any]:
        counts = {s: len(self.with_status(s)) for s in ("ok", "mismatch", "shape", "missing",
                                                         "extra")}
        return {"a": {"path": self.path_a, "kind": self.kind_a},
                "b": {"path": self.path_b, "kind": self.kind_b},
                "heads": self.heads.to_json(), "passed": bool(self),
                "summary": {"pairs": len(self.pairs), **counts},
                "by_dtype": [{**r, "max_rel_l2": json_number(r["max_rel_l2"]),
                              "max_abs": json_number(r["max_abs"])} for r in self.by_dtype()],
                "pairs": [p.to_json() for p in self.pairs]}

    def write_json(self, path: str | Path) -> None:
        write_json_file(self.to_json(), path)


def _keyed(ckpt: Checkpoint, rename: Rename | None, side: str) -> dict[str, TensorSource]:
    out: dict[str, TensorSource] = {}
    for src in ckpt.tensors():
        name = src.name if rename is None else rename(src.name, side)
        if name is not None:
            key, _ = canonical_weight(name)
            out.setdefault(key, src)  # a duplicate under a second wrapper name: the first wins
    return out


def _order(key: str) -> tuple[Any, ...]:
    """Natural order: embeddings, layers by number, then the rest."""
    parts = tuple((0, int(p), "") if p.isdigit() else (1, 0, p) for p in key.split("."))
    head = {"embed": 0, "layers": 1}.get(key.split(".")[0], 2)
    return (head, parts)


def _plan(a: dict[str, TensorSource], b: dict[str, TensorSource]
          ) -> Iterator[tuple[str, TensorSource | None, TensorSource | None, bool]]:
    tie_a = "lm_head.weight" not in a and "lm_head.weight" in b and "embed.weight" in a
    tie_b = "lm_head.weight" not in b and "lm_head.weight" in a and "embed.weight" in b
    for key in sorted(set(a) | set(b), key=_order):
        if key == "lm_head.weight" and (tie_a or tie_b):
            yield key, a["embed.weight"] if tie_a else a[key], \
                b["embed.weight"] if tie_b else b[key], True
        else:
            yield key, a.get(key), b.get(key), False


def _compare(key: str, sa: TensorSource, sb: TensorSource, tied: bool,
             heads: Heads) -> PairResult:
    budget = error_budget(sa.dtype) + error_budget(sb.dtype)
    base = PairResult(key, sa.name, sb.name, sa.dtype, sb.dtype, sa.shape, sb.shape, "shape",
                      tied=tied, budget=budget)
    # A may be one tensor-parallel rank's shard of B (a rank's own state dict, saved): then
    # B's slices are brought to A, and the transform says so
    fits = bool(layouts(key, sa.shape, sb.shape, heads))
    shard_of_b = not fits and bool(shard_layouts(sb.shape, sa.shape, ()))
    if not fits and not shard_of_b:
        return base
    try:
        for side, src in (("A", sa), ("B", sb)):
            if src.repeat > 1:
                raise UnreadableTensor(side, f"expanded from {src.nbytes:,} stored bytes to "
                                             f"{math.prod(src.shape):,} elements (stride 0); "
                                             "not compared", tensor=src.name)
        arr_a, arr_b = read_array(sa), read_array(sb)
    except UnreadableTensor as exc:
        return replace(base, status="unreadable", note=f"{exc.tensor}: {exc.reason}")
    errors: dict[int, tuple[float, float]] = {}  # by id(x): x stays alive while it matters

    def judge(x: np.ndarray, b: np.ndarray) -> tuple[bool, float]:
        errors[id(x)] = e = pair_errors(x, b)
        return e[1] <= budget, e[1]

    found = match_layout(arr_b, arr_a, key, heads, judge) if shard_of_b else \
        match_layout(arr_a, arr_b, key, heads, judge)
    assert found is not None
    transform, head_dim, x, ok = found
    max_abs, rel = errors[id(x)]
    return replace(base, status="ok" if ok else "mismatch",
                   transform=f"A = B's {transform}" if shard_of_b else transform,
                   head_dim=head_dim, max_abs=max_abs, rel_l2=rel)


def _lone_shard(results: list[PairResult]) -> list[PairResult]:
    """A tensor of A equal to a shard of B's is one rank's only beside others: alone, it is a
    tensor cut short, its shape the problem."""
    shards = [p for p in results if p.transform.startswith("A = B's shard")]
    if len(shards) != 1:
        return results
    lone = shards[0]
    return [replace(p, status="shape", note=f"A holds {p.transform.removeprefix('A = ')} "
                    "alone: a tensor cut short (one rank's checkpoint shards others too)")
            if p is lone else p for p in results]


def against_checkpoints(path_a: str | Path, path_b: str | Path, *, heads: Heads | None = None,
                        progress: Progress | None = None,
                        rename: Rename | None = None) -> AgainstReport:
    """Pair every tensor of A with B's, find the layout, measure the error after it.

    ``heads`` overrides the head counts read from GGUF metadata or a config.json beside the
    weights (they locate the Q/K row permutation; without them common head sizes are tried).
    A fused tensor of one side (``qkv_proj``, ``gate_up_proj``) pairs with the other side's
    parts stacked by rows. ``rename(name, side)`` renames A's names (side "cand") to B's,
    or leaves a tensor out (None): a mapping file's rules (checkpoint/weight_mapping.py).
    Raises CheckpointError (a LockstepError) for a missing, corrupt or truncated checkpoint.
    """
    ckpt_a, ckpt_b = open_checkpoint(path_a), open_checkpoint(path_b)
    geometry = (heads or Heads()).merged(heads_of(ckpt_a)).merged(heads_of(ckpt_b))
    keyed_a, keyed_b = _keyed(ckpt_a, rename, "cand"), _keyed(ckpt_b, rename, "ref")
    fuse_parts(keyed_b, list(keyed_a))
    fuse_parts(keyed_a, list(keyed_b))
    stack_experts(keyed_b, list(keyed_a))
    stack_experts(keyed_a, list(keyed_b))
    plan = list(_plan(keyed_a, keyed_b))
    results = []
    for i, (key, sa, sb, tied) in enumerate(plan):
        if sa is None or sb is None:
            src = sa if sb is None else sb
            assert src is not None
            one = (src.name, src.dtype, src.shape)
            none = (None, None, None)
            (na, da, ha), (nb, db, hb) = (one, none) if sb is None else (none, one)
            results.append(PairResult(key, na, nb, da, db, ha, hb,
                                      "extra" if sb is None else "missing"))
        else:
            results.append(_compare(key, sa, sb, tied, geometry))
        if progress is not None:
            progress(i + 1, len(plan))
    results = _lone_shard(results)
    return AgainstReport(str(ckpt_a.path), str(ckpt_b.path), ckpt_a.kind, ckpt_b.kind,
                         geometry, tuple(results))

