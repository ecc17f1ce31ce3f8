"""RoPE frequencies with the scaling schemes of Llama 3.1 (``llama3``) and YaRN, and the
attention factor YaRN multiplies cos and sin by. Formulas follow the papers and Meta's
reference code; ``dim`` is the rotated width (head_dim times the partial rotary factor)."""

from __future__ import annotations

import math
from typing import Any, Mapping

import torch
from torch import Tensor

__all__ = ["inv_freq"]


def _plain(dim: int, theta: float, device: Any) -> Tensor:
    exponents = torch.arange(0, dim, 2, dtype=torch.float, device=device) / dim
    return 1.0 / (theta ** exponents)


def _llama3(base: Tensor, p: Mapping[str, Any]) -> Tensor:
    """Llama 3.1: long wavelengths slowed by ``factor``, short ones kept, a blend between."""
    factor = float(p["factor"])
    low, high = float(p["low_freq_factor"]), float(p["high_freq_factor"])
    context = float(p["original_max_position_embeddings"])
    wavelen = 2 * math.pi / base
    slowed = torch.where(wavelen > context / low, base / factor, base)
    smooth = (context / wavelen - low) / (high - low)
    blended = (1 - smooth) * slowed / factor + smooth * slowed
    middle = (wavelen >= context / high) & (wavelen <= context / low)
    return torch.where(middle, blended, slowed)


def _yarn_mscale(p: Mapping[str, Any]) -> float:
    """YaRN's attention factor: given, else 0.1 * ln(factor) + 1 (1 for factor <= 1)."""
    if p.get("attention_factor") is not None:
        return float(p["attention_factor"])
    factor = float(p["factor"])
    return 1.0 if factor <= 1 else 0.1 * math.log(factor) + 1.0


def _yarn(dim: int, theta: float, p: Mapping[str, Any], bug: str | None,
          device: Any) -> Tensor:
    """YaRN ("NTK-by-parts"): frequencies below a ramp interpolated by ``factor``, above it
    kept; the ramp runs between the dims that turn beta_fast and beta_slow times over the
    original context."""
    factor = float(p["factor"])
    context = float(p["original_max_position_embeddings"])
    fast, slow = float(p.get("beta_fast") or 32), float(p.get("beta_slow") or 1)
    if bug == "yarn_beta_swapped":
        fast, slow = slow, fast  # torchtitan#3787: low from beta_slow, high from beta_fast

    def turns_dim(turns: float) -> float:
        return dim * math.log(context / (turns * 2 * math.pi)) / (2 * math.log(theta))

    low, high = turns_dim(fast), turns_dim(slow)
    if p.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001
    ramp = ((torch.arange(dim // 2, dtype=torch.float32, device=device) - low)
            / (high - low)).clamp(0, 1)
    kept = 1 - ramp  # the share of each frequency extrapolated (kept as is)
    base = _plain(dim, theta, device)
    return base / factor * (1 - kept) + base * kept


def inv_freq(dim: int, theta: float, scaling: Mapping[str, Any] | None, bug: str | None,
             device: Any) -> tuple[Tensor, float]:
    """The inverse frequency of each rotated pair, and the factor cos/sin are scaled by."""
    kind = (scaling or {}).get("rope_type", "default")
    if kind == "llama3" and bug != "llama3_rope_ignored":
        return _llama3(_plain(dim, theta, device), scaling or {}), 1.0
    if kind == "yarn":
        mscale = _yarn_mscale(scaling or {})
        if bug == "yarn_attention_factor_missing":
            mscale = 1.0  # exllamav3#259: the factor collapses to 1
        elif bug == "yarn_mscale_squared":
            mscale = mscale * mscale  # sglang#33558: the final factor scaled by itself again
        return _yarn(dim, theta, scaling or {}, bug, device), mscale
    return _plain(dim, theta, device), 1.0
