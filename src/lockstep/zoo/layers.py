"""The zoo model's small building blocks: RMSNorm, RoPE, the SwiGLU MLP and the lm_head."""

from __future__ import annotations

from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .boundary_bugs import ROPE_CACHE_POSITIONS

__all__ = ["RMSNorm", "Rope", "FeedForward", "LMHead"]


class RMSNorm(nn.Module):
    """Root-mean-square norm over the last dim.

    The statistics are taken in float32 whatever the dtype, as transformers takes them (so a
    float64 run matches transformers' float64 run to 1e-10).
    """

    def __init__(self, dim: int, eps: float, bug: str | None = None, offset: bool = False) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps
        self.bug = bug
        self.offset = offset  #: Gemma's weights hold the scale minus one

    @property
    def scale(self) -> Tensor:
        """The per-channel scale the normalised input is multiplied by."""
        if self.bug == "norm_unit_offset":
            return 1 + self.weight  # Gemma's convention, wrong for Llama and Qwen3 weights
        if self.offset and self.bug == "norm_offset_twice":
            return 2 + self.weight  # imp#459: the offset added to weights that already hold it
        if self.offset and self.bug != "norm_no_unit_offset":
            return 1 + self.weight
        return self.weight

    def normalize(self, x: Tensor, stats: Tensor | None = None) -> Tensor:
        """``x`` divided by the RMS of ``stats`` (default: of ``x``) over the last dim."""
        stats = x if stats is None else stats
        variance = stats.to(torch.float32).pow(2).mean(-1, keepdim=True)
        return (x.to(torch.float32) * torch.rsqrt(variance + self.eps)).to(x.dtype)

    def forward(self, x: Tensor) -> Tensor:
        return self.scale * self.normalize(x)


class Rope(nn.Module):
    """Rotary position embedding of Q and K shaped (batch, seq, heads, head_dim).

    Half-split pairs (element i turns with element i + head_dim / 2), transformers' convention;
    the angles are computed in float32 and cast to the activations' dtype, as transformers does.
    With ``rotary_dim`` (partial rotary) only the first ``rotary_dim`` elements of a head turn;
    ``scaling`` is a ``llama3`` or YaRN rope_parameters dict (rope_scaling.py).
    """

    def __init__(self, head_dim: int, theta: float, bug: str | None = None,
                 rotary_dim: int | None = None, scaling: Any = None) -> None:
        super().__init__()
        self.head_dim = head_dim
        self.theta = theta
        self.bug = bug
        self.rotary_dim = rotary_dim or head_dim
        self.scaling = scaling

    def cos_sin(self, positions: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        """cos and sin of every position's angles, shaped (batch, seq, 1, rotary_dim)."""
        from .rope_scaling import inv_freq as frequencies

        inv_freq, factor = frequencies(self.rotary_dim, self.theta, self.scaling, self.bug,
                                       positions.device)
        if self.bug == "partial_rotary_pairs" and self.rotary_dim < self.head_dim:
            # pie#603: the rotated pairs' frequencies taken over the whole head, and pairs
            # (i, i + head_dim / 2) over the whole head; the other pairs turn by 0
            even = torch.arange(0, self.rotary_dim, 2, device=positions.device).float()
            turned = 1.0 / (self.theta ** (even / self.head_dim))
            inv_freq = torch.cat((turned, turned.new_zeros((self.head_dim - self.rotary_dim) // 2)))
        if self.bug == "rope_cache_short":  # a cache of fewer rows than the context
            positions = positions.clamp(max=ROPE_CACHE_POSITIONS - 1)
        freqs = positions[..., None].float() * inv_freq
        if self.bug == "rope_interleaved":
            angles = freqs.repeat_interleave(2, dim=-1)  # pairs (0, 1), (2, 3), ...
        else:
            angles = torch.cat((freqs, freqs), dim=-1)  # pairs (0, D/2), (1, D/2 + 1), ...
        cos, sin = angles.cos() * factor, angles.sin() * factor
        return cos.to(dtype)[:, :, None], sin.to(dtype)[:, :, None]

    def rotate_half(self, x: Tensor) -> Tensor:
        """Each element's rotation partner, negated where the rotation subtracts it."""
        if self.bug == "rope_interleaved":
            return torch.stack((-x[..., 1::2], x[..., ::2]), dim=-1).flatten(-2)
        first, second = x.chunk(2, dim=-1)
        return torch.cat((-second, first), dim=-1)

    def forward(self, q: Tensor, k: Tensor, positions: Tensor) -> tuple[Tensor, Tensor]:
        cos, sin = self.cos_sin(positions, q.dtype)
        width = cos.shape[-1]
        if width == self.head_dim:
            return q * cos + self.rotate_half(q) * sin, k * cos + self.rotate_half(k) * sin
        # partial rotary: the first rotary_dim elements turn, the rest pass through
        turned = [torch.cat((x[..., :width] * cos + self.rotate_half(x[..., :width]) * sin,
                             x[..., width:]), dim=-1) for x in (q, k)]
        return turned[0], turned[1]


class FeedForward(nn.Module):
    """The SwiGLU MLP: ``w2(silu(w1(x)) * w3(x))`` (w1 the gate, w3 the up projection)."""

    def __init__(self, dim: int, hidden_dim: int) -> None:
        super().__init__()
        #: the gate's activation (families.py may set tanh GELU)
        self.act: Callable[[Tensor], Tensor] = F.silu
        self.w1 = nn.Linear(dim, hidden_dim, bias=False)
        self.w2 = nn.Linear(hidden_dim, dim, bias=False)
        self.w3 = nn.Linear(dim, hidden_dim, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.w2(self.act(self.w1(x)) * self.w3(x))


class LMHead(nn.Linear):
    """The output projection to the vocabulary, its weight shaped (vocab, hidden)."""

    def __init__(self, dim: int, vocab_size: int, bug: str | None = None) -> None:
        super().__init__(dim, vocab_size, bias=False)
        self.bug = bug

    def forward(self, x: Tensor) -> Tensor:
        if self.bug == "lm_head_layout":
            # seed 004's cuBLAS call (CUBLAS_OP_N, leading dimension vocab) reads the row-major
            # (vocab, hidden) buffer as if it were laid out (hidden, vocab)
            return x @ self.weight.reshape(self.in_features, self.out_features)
        return super().forward(x)
