"""The family-specific pieces of the zoo model: Gemma's scaled embedding, the gated MLP with
the family's activation (fused for Phi-3), and the final logit soft cap."""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .config import ModelArgs
from .layers import FeedForward

__all__ = ["ScaledEmbedding", "FusedFeedForward", "embedding", "feed_forward",
           "final_softcap"]


def _gelu_tanh(x: Tensor) -> Tensor:
    return F.gelu(x, approximate="tanh")


class ScaledEmbedding(nn.Embedding):
    """Embedding rows times a constant (Gemma: √hidden, cast to the weights' dtype first, as
    transformers casts it)."""

    def __init__(self, vocab_size: int, dim: int, scale: float, bug: str | None) -> None:
        super().__init__(vocab_size, dim)
        self.scale = scale
        self.bug = bug

    def forward(self, tokens: Tensor) -> Tensor:
        scale = torch.tensor(self.scale, dtype=self.weight.dtype)
        rows = super().forward(tokens) * scale
        if self.bug == "embed_scale_twice":
            rows = rows * scale  # OpenTau#179: the scaled embedding scaled again
        return rows


class FusedFeedForward(nn.Module):
    """Phi-3's MLP: one ``w13`` projection giving gate and up, ``w2(act(gate) * up)``."""

    def __init__(self, dim: int, hidden_dim: int) -> None:
        super().__init__()
        self.act: Callable[[Tensor], Tensor] = F.silu
        self.w13 = nn.Linear(dim, 2 * hidden_dim, bias=False)
        self.w2 = nn.Linear(hidden_dim, dim, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        gate, up = self.w13(x).chunk(2, dim=-1)
        return self.w2(self.act(gate) * up)


def embedding(args: ModelArgs) -> nn.Embedding:
    if args.extra.embed_scale is None:
        return nn.Embedding(args.vocab_size, args.dim)
    return ScaledEmbedding(args.vocab_size, args.dim, args.extra.embed_scale, args.bug)


def feed_forward(args: ModelArgs) -> nn.Module:
    ff: FeedForward | FusedFeedForward
    ff = FusedFeedForward(args.dim, args.hidden_dim) if args.extra.fused else \
        FeedForward(args.dim, args.hidden_dim)
    if args.extra.act == "gelu_tanh":
        # vllm#3411: exact GELU where Gemma's weights were trained with the tanh approximation
        ff.act = F.gelu if args.bug == "gelu_exact" else _gelu_tanh
    return ff


def final_softcap(args: ModelArgs, logits: Tensor) -> Tensor:
    """The logits soft-capped (Gemma 2), after the lm_head whose output is recorded."""
    cap = args.extra.final_softcap
    if cap is None:
        return logits
    return torch.tanh(logits / cap) * cap
