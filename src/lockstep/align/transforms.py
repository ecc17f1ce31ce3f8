"""Layout transforms that bring an engine's tensor into the canonical (transformers) layout."""

from __future__ import annotations

from typing import Any, Callable, Mapping

import numpy as np

from ..errors import LockstepError

__all__ = ["TRANSFORMS", "apply_transform"]


def _rope_interleaved(arr: np.ndarray, meta: Mapping[str, Any]) -> np.ndarray:
    """Undo the per-head row permutation that GGUF conversion applies to Q and K weights:
    GGUF feature 2i+j of a head is transformers' feature j*(D/2)+i (D = head_dim)."""
    head_dim = int(meta.get("head_dim") or 0)
    if head_dim <= 1 or head_dim % 2 or arr.shape[-1] % head_dim:
        raise LockstepError(f"cannot undo the RoPE row permutation: head_dim {head_dim!r} "
                            f"(run metadata) does not divide the last dim of {arr.shape}")
    lead = arr.shape[:-1]
    heads = arr.reshape(*lead, -1, head_dim // 2, 2)
    return np.swapaxes(heads, -1, -2).reshape(arr.shape)


TRANSFORMS: dict[str, Callable[[np.ndarray, Mapping[str, Any]], np.ndarray]] = {
    "rope_interleaved": _rope_interleaved,
}


def apply_transform(name: str | None, arr: np.ndarray, meta: Mapping[str, Any]) -> np.ndarray:
    """``arr`` in the canonical layout (unchanged when ``name`` is None)."""
    if name is None:
        return arr
    return TRANSFORMS[name](arr, meta)
