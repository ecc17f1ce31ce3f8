"""Float8 weights an engine quantized when loading: ``q`` and the scale it is multiplied by.

vLLM's ``--quantization fp8`` (and compressed-tensors, DeepSeek's block-wise checkpoints) hold
a float8 ``weight`` and a ``weight_scale`` (``weight_scale_inv``) beside it, where a
higher-precision checkpoint holds ``w = q * scale``. ``float8_scales`` finds those pairs in a
model's state; ``scale_like`` brings a scale to its weight's shape, so that
checkpoint/weights.py can hold ``q`` against the checkpoint's ``w / scale`` rounded to float8.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from .tensors import TensorSource
from .weight_names import canonical_weight

__all__ = ["scale_like", "float8_scales"]

#: suffixes of the tensor that scales a float8 weight (w = q * scale): vLLM's and
#: compressed-tensors' ``weight_scale``, DeepSeek's block-wise ``weight_scale_inv``
_SCALES = (".weight_scale", ".weight_scale_inv")
_BLOCKS = (128, 64, 32, 16, 256)


def scale_like(s: np.ndarray, shape: tuple[int, ...], parts: Sequence[int]
               ) -> np.ndarray | None:
    """A float8 weight's scale brought to the weight's ``shape``: one per tensor, one per
    fused part (``parts``: their rows), per row, per column (a weight stored transposed, as
    vLLM's CUTLASS path holds it), or per square block (DeepSeek's 128 x 128); None if it
    fits none of these."""
    flat = s.reshape(-1).astype(np.float64)
    if flat.size == 1:
        return np.full((1,) * len(shape), flat[0])
    if len(shape) != 2:
        return None
    rows, cols = shape
    if parts and flat.size == len(parts) and sum(parts) == rows:
        return np.repeat(flat, parts)[:, None]
    if flat.size == rows:
        return flat[:, None]
    if flat.size == cols:
        return flat[None, :]
    if s.ndim == 2:
        for b in _BLOCKS:
            if s.shape == (-(-rows // b), -(-cols // b)):
                return np.repeat(np.repeat(s.astype(np.float64), b, 0), b, 1)[:rows, :cols]
    return None


def float8_scales(torch: Any, state: dict[str, Any], sources: dict[str, TensorSource]
                  ) -> tuple[dict[str, tuple[str, np.ndarray]], set[str]]:
    """({float8 weight: (its scale's name, the scale)}, the scale and input-scale tensors of
    those weights that the checkpoint lacks): an engine that quantized a
    higher-precision checkpoint to float8 when loading (vLLM's ``--quantization fp8``) holds
    ``q`` and ``weight_scale`` where the checkpoint holds ``w = q * weight_scale``. Such
    scales are the engine's own, not checkpoint tensors it failed to load; a float8
    checkpoint's own weights compare as stored."""
    by: dict[str, tuple[str, np.ndarray]] = {}
    used: set[str] = set()
    for name, t in state.items():
        if not (name.endswith(".weight") and "float8" in str(t.dtype)):
            continue
        src = sources.get(canonical_weight(name)[0])
        if src is None or src.dtype.upper().startswith(("F8", "FLOAT8")):  # float8 itself
            continue
        stem = name[:-len(".weight")]
        for suffix in _SCALES:
            scale = state.get(stem + suffix)
            if scale is not None and scale.device.type != "meta":
                by[name] = (stem + suffix, scale.detach().to("cpu").to(torch.float64).numpy())
                used.update(n for n in (stem + suffix, stem + ".input_scale")
                            if canonical_weight(n)[0] not in sources)
                break
    return by, used
