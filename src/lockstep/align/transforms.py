"""Layout transforms: bring one engine's tensor into the other's (the canonical) layout.

A transform is a small pipeline written as text, steps separated by ``|``; the same text is
what name tables, mapping files and the report use::

    squeeze                     drop size-1 dims
    flatten                     to one dimension
    reshape(-1, n_heads, head_dim)
    permute(1, 0, 2)            reorder dims
    transpose(-1, -2)           swap two dims (the last two when no arguments)
    slice(-1, 0, 64)            elements 0..63 of a dim (a fused QKV's Q part)
    block(16, 3)                flattened, the 16 elements of block 3
    cast(float64)
    rope_interleaved            half-split RoPE order from interleaved (per head)
    rope_halfsplit              interleaved RoPE order from half-split (per head)

Sizes may be written as ``head_dim``, ``n_heads``, ``n_kv_heads`` or ``n_ff`` (the MLP
width), read from the run metadata of the dump the tensor comes from, and combined with
``+``, ``-``, ``*`` and parentheses: ``slice(-1, n_heads*head_dim, (n_heads+n_kv_heads)*head_dim)``.
"""

from __future__ import annotations

import ast
import functools
import re
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from ..errors import LockstepError, UsageError

__all__ = ["Transform", "parse_transform", "apply_transform", "meta_size", "merged_meta",
           "STEP_NAMES", "squeeze_shape", "squeeze"]

_STEP = re.compile(r"^\s*([a-z_]+)\s*(?:\((.*)\))?\s*$")
_SYMBOLS = {"head_dim": ("head_dim",), "n_heads": ("n_heads", "n_head", "num_attention_heads"),
            "n_kv_heads": ("n_kv_heads", "n_head_kv", "num_key_value_heads"),
            "n_ff": ("n_ff", "intermediate_size")}
_OPS = {ast.Add: lambda a, b: a + b, ast.Sub: lambda a, b: a - b, ast.Mult: lambda a, b: a * b}


def meta_size(meta: Mapping[str, Any], symbol: str) -> int | None:
    """A model size named in the run metadata (``head_dim``, ``n_heads``, ``n_kv_heads``)."""
    for key in _SYMBOLS.get(symbol, (symbol,)):
        value = meta.get(key)
        if isinstance(value, int) and value > 0:
            return value
    if symbol == "head_dim":
        hidden, heads = meta.get("n_embd") or meta.get("hidden_size"), meta_size(meta, "n_heads")
        if isinstance(hidden, int) and heads:
            return hidden // heads
    return None


def _check_size(arg: str) -> ast.expr:
    """The parsed size expression; UsageError unless it is integers and size symbols
    combined with + - * and parentheses."""
    try:
        tree = ast.parse(arg.strip(), mode="eval").body
    except SyntaxError:
        tree = None
    for node in ast.walk(tree) if tree is not None else ():
        if isinstance(node, ast.Name) and node.id not in _SYMBOLS:
            break
        if not isinstance(node, (ast.BinOp, ast.UnaryOp, ast.Constant, ast.Name, ast.Load,
                                 ast.Add, ast.Sub, ast.Mult, ast.USub)):
            break
        if isinstance(node, ast.Constant) and not isinstance(node.value, int):
            break
    else:
        if tree is not None:
            return tree
    raise UsageError(f"size {arg.strip()!r} is not an integer or an expression of integers "
                     f"and {', '.join(_SYMBOLS)} with + - * and parentheses")


def _eval(node: ast.expr, meta: Mapping[str, Any]) -> int:
    if isinstance(node, ast.Constant):
        assert isinstance(node.value, int)  # _check_size lets only integer constants through
        return node.value
    if isinstance(node, ast.UnaryOp):
        return -_eval(node.operand, meta)
    if isinstance(node, ast.BinOp):
        return _OPS[type(node.op)](_eval(node.left, meta), _eval(node.right, meta))
    assert isinstance(node, ast.Name)
    value = meta_size(meta, node.id)
    if value is None:
        raise LockstepError(f"transform needs {node.id}, which the run metadata does not give")
    return value


def _size(arg: str, meta: Mapping[str, Any]) -> int:
    return _eval(_check_size(arg), meta)


def _head_dim(arr: np.ndarray, meta: Mapping[str, Any], what: str) -> int:
    head_dim = meta_size(meta, "head_dim") or 0
    if head_dim <= 1 or head_dim % 2 or arr.shape[-1] % head_dim:
        raise LockstepError(f"cannot {what}: head_dim {head_dim!r} (run metadata) does not "
                            f"divide the last dim of {arr.shape}")
    return head_dim


def _rope_interleaved(arr: np.ndarray, meta: Mapping[str, Any]) -> np.ndarray:
    """Interleaved feature 2i+j of a head is half-split feature j*(D/2)+i (D = head_dim)."""
    d = _head_dim(arr, meta, "undo the interleaved RoPE order")
    heads = arr.reshape(*arr.shape[:-1], -1, d // 2, 2)
    return np.swapaxes(heads, -1, -2).reshape(arr.shape)


def _rope_halfsplit(arr: np.ndarray, meta: Mapping[str, Any]) -> np.ndarray:
    d = _head_dim(arr, meta, "interleave the half-split RoPE order")
    heads = arr.reshape(*arr.shape[:-1], -1, 2, d // 2)
    return np.swapaxes(heads, -1, -2).reshape(arr.shape)


def _slice(arr: np.ndarray, dim: int, start: int, stop: int) -> np.ndarray:
    if not -arr.ndim <= dim < arr.ndim or not 0 <= start < stop <= arr.shape[dim]:
        raise LockstepError(f"slice({dim}, {start}, {stop}) is outside a tensor of shape "
                            f"{arr.shape}")
    index = [slice(None)] * arr.ndim
    index[dim] = slice(start, stop)
    return arr[tuple(index)]


def _block(arr: np.ndarray, size: int, index: int) -> np.ndarray:
    flat = arr.reshape(-1)
    if size <= 0 or index < 0 or size * (index + 1) > flat.size:
        raise LockstepError(f"block({size}, {index}) is outside a tensor of {flat.size} "
                            "elements")
    return flat[size * index:size * (index + 1)]


def _reshape(arr: np.ndarray, *shape: int) -> np.ndarray:
    try:
        return arr.reshape(shape)
    except ValueError:
        raise LockstepError(f"cannot reshape {arr.shape} to {shape}") from None


def squeeze_shape(shape: Sequence[int]) -> tuple[int, ...]:
    """The shape without its size-1 dims: ``(1, 7, 64)`` and ``(7, 64)`` are the same."""
    return tuple(n for n in shape if n != 1)


def squeeze(arr: np.ndarray) -> np.ndarray:
    """``arr`` without its size-1 dims (the ``squeeze`` step)."""
    return arr.reshape(squeeze_shape(arr.shape))


def _permute(arr: np.ndarray, *axes: int) -> np.ndarray:
    if sorted(a % arr.ndim for a in axes) != list(range(arr.ndim)) or len(axes) != arr.ndim:
        raise LockstepError(f"permute{axes} does not fit a tensor of shape {arr.shape}")
    return np.transpose(arr, axes)


def _transpose(arr: np.ndarray, a: int = -1, b: int = -2) -> np.ndarray:
    if arr.ndim < 2:
        raise LockstepError(f"cannot transpose a tensor of shape {arr.shape}")
    return np.swapaxes(arr, a, b)


def _cast(arr: np.ndarray, dtype: str) -> np.ndarray:
    return arr.astype(np.dtype(dtype))


# step name -> (function, takes sizes as arguments)
_STEPS: dict[str, tuple[Callable[..., np.ndarray], bool]] = {
    "squeeze": (squeeze, True),
    "flatten": (lambda a: a.reshape(-1), True),
    "reshape": (_reshape, True),
    "permute": (_permute, True),
    "transpose": (_transpose, True),
    "slice": (_slice, True),
    "block": (_block, True),
    "cast": (_cast, False),
}
_META_STEPS = {"rope_interleaved": _rope_interleaved, "rope_halfsplit": _rope_halfsplit}
#: how many arguments each step takes (min, max; None: any number)
_ARITY: dict[str, tuple[int, int | None]] = {
    "squeeze": (0, 0), "flatten": (0, 0), "reshape": (1, None), "permute": (1, None),
    "transpose": (0, 2), "slice": (3, 3), "block": (2, 2), "cast": (1, 1),
    "rope_interleaved": (0, 0), "rope_halfsplit": (0, 0)}
STEP_NAMES = tuple(_STEPS) + tuple(_META_STEPS)


@dataclass(frozen=True)
class Transform:
    """A parsed transform pipeline; call it with a tensor and the run metadata."""

    spec: str
    steps: tuple[tuple[str, tuple[str, ...]], ...]

    def __call__(self, arr: np.ndarray, meta: Mapping[str, Any]) -> np.ndarray:
        for name, args in self.steps:
            if name in _META_STEPS:
                arr = _META_STEPS[name](arr, meta)
                continue
            fn, sized = _STEPS[name]
            arr = fn(arr, *([_size(a, meta) for a in args] if sized else args))
        return arr

    def __str__(self) -> str:
        return self.spec


@functools.lru_cache(maxsize=512)
def parse_transform(spec: str) -> Transform:
    """Parse ``"reshape(-1, n_heads, head_dim)|permute(1, 0, 2)"``; UsageError if malformed."""
    steps = []
    for part in spec.split("|"):
        m = _STEP.match(part)
        if m is None or m.group(1) not in STEP_NAMES:
            raise UsageError(f"transform {spec!r}: {part.strip()!r} is not one of "
                             f"{', '.join(STEP_NAMES)}")
        name = m.group(1)
        args = tuple(a.strip() for a in m.group(2).split(",")) if m.group(2) else ()
        args = tuple(a for a in args if a)
        low, high = _ARITY[name]
        if len(args) < low or (high is not None and len(args) > high):
            want = (f"{low}" if low == high else f"{low} or more" if high is None
                    else f"{low} to {high}")
            raise UsageError(f"transform {spec!r}: {name} takes {want} arguments, "
                             f"got {len(args)}")
        if name == "cast":
            try:
                np.dtype(args[0])
            except TypeError:
                raise UsageError(f"transform {spec!r}: cast: {args[0]!r} is not a numpy "
                                 "dtype (e.g. float32)") from None
        elif name not in _META_STEPS:
            for a in args:
                try:
                    _check_size(a)
                except UsageError as exc:
                    raise UsageError(f"transform {spec!r}: {name} {exc}") from None
        steps.append((name, args))
    return Transform(spec, tuple(steps))


def apply_transform(spec: str | None, arr: np.ndarray, meta: Mapping[str, Any]) -> np.ndarray:
    """``arr`` after the transform ``spec`` (unchanged when ``spec`` is None)."""
    if not spec:
        return arr
    return parse_transform(spec)(arr, meta)


def merged_meta(ref: Any, cand: Any) -> Mapping[str, object]:
    """The metadata the candidate's transforms read: its run metadata, with the reference's
    sizes where it gives none (a table's ``slice(-1, 0, n_ff)``, a RoPE layout's
    ``head_dim``, on a candidate that records no model sizes: the same model's) or another
    value."""
    merged = {**ref.meta, **{k: v for k, v in cand.meta.items() if v is not None}}
    for symbol, keys in _SYMBOLS.items():  # both give a size, and they differ: one is wrong
        ref_size = meta_size(ref.meta, symbol)
        if ref_size is not None and meta_size(cand.meta, symbol) not in (None, ref_size):
            # the reference's, which ran with it: the candidate's tensors are of the same
            # model (the weights fix the sizes), and a metadata writer's slip must not
            # unfold them wrong (a wrong head_dim moved every q/k feature)
            for key in keys:
                merged.pop(key, None)
            merged[keys[0]] = ref_size
    return merged
