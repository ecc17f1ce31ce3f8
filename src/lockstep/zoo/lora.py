"""A minimal LoRA: a linear layer that can carry one low-rank adapter."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["LoRALinear", "attach_nan_adapter"]


class LoRALinear(nn.Linear):
    """``nn.Linear`` plus an optional adapter: ``y = x W^T + scale * (x A^T) B^T``.

    A is (rank, in_features), B is (out_features, rank). The adapter's matrices are parameters
    of this module, not submodules, so the module tree (and every recorded name) is the same
    with or without one.
    """

    lora_a: nn.Parameter | None
    lora_b: nn.Parameter | None

    def __init__(self, in_features: int, out_features: int, bias: bool = False) -> None:
        super().__init__(in_features, out_features, bias=bias)
        self.register_parameter("lora_a", None)
        self.register_parameter("lora_b", None)
        self.lora_scale = 0.0

    def attach(self, a: Tensor, b: Tensor, scale: float) -> None:
        """Apply the adapter (A, B) with ``scale`` (alpha / rank) from now on."""
        rank = a.shape[0]
        if (tuple(a.shape), tuple(b.shape)) != ((rank, self.in_features),
                                                (self.out_features, rank)):
            raise ValueError(f"adapter shapes {tuple(a.shape)}, {tuple(b.shape)} do not fit "
                             f"a ({self.out_features}, {self.in_features}) layer")
        self.lora_a = nn.Parameter(a.to(self.weight), requires_grad=False)
        self.lora_b = nn.Parameter(b.to(self.weight), requires_grad=False)
        self.lora_scale = scale

    def merged_weight(self) -> Tensor:
        """The weight with the adapter folded in (what ``merge_and_unload`` would store)."""
        if self.lora_a is None or self.lora_b is None:
            return self.weight
        return self.weight + self.lora_scale * (self.lora_b @ self.lora_a)

    def forward(self, x: Tensor) -> Tensor:
        y = super().forward(x)
        if self.lora_a is not None and self.lora_b is not None:
            y = y + self.lora_scale * F.linear(F.linear(x, self.lora_a), self.lora_b)
        return y


def attach_nan_adapter(layer: LoRALinear, *, rank: int = 8, alpha: float = 16.0,
                       seed: int = 0) -> None:
    """Attach an adapter whose B matrix is all NaN, as a training run that diverged leaves it
    (seed 003 found 534 such tensors in one adapter file)."""
    generator = torch.Generator().manual_seed(seed)
    a = torch.randn(rank, layer.in_features, generator=generator) / layer.in_features ** 0.5
    b = torch.full((layer.out_features, rank), float("nan"))
    layer.attach(a, b, alpha / rank)
