"""A transformers model run the way many real engines run it: every linear with bfloat16 (or
float16) operands and a float32 result, or one layer's output projection off by a fraction.
Its records say float32, as such engines' do. A ``py:`` engine:
``py:tests/engines/precision.py:PrecisionEngine`` with options ``model=DIR``,
``operands=bfloat16|float16``, ``o_proj_scale=1.01``, ``up_scale=1.05`` (layer ``layer``)."""

from __future__ import annotations

import types
from typing import Any

import torch
import torch.nn.functional as F

from lockstep.engines.hf import HFEngine


def _linear_in(dtype: torch.dtype) -> Any:
    def forward(self: torch.nn.Linear, x: torch.Tensor) -> torch.Tensor:
        bias = None if self.bias is None else self.bias.to(dtype)
        return F.linear(x.to(dtype), self.weight.to(dtype), bias).float()
    return forward


def bf16_linears(model: Any, dtype: torch.dtype) -> Any:
    """``model`` with every linear run on ``dtype`` operands and a float32 result."""
    forward = _linear_in(dtype)
    for module in model.modules():
        if isinstance(module, torch.nn.Linear):
            module.forward = types.MethodType(forward, module)
    return model


class PrecisionEngine(HFEngine):
    name = "precision-test-engine"

    def __init__(self, spec: str, *, model: str, operands: str | None = None,
                 o_proj_scale: float | None = None, up_scale: float | None = None,
                 layer: int = 0) -> None:
        super().__init__(spec, model, dtype="float32")
        self.operands = operands
        self.o_proj_scale = o_proj_scale
        self.up_scale = up_scale
        self.layer = int(layer)

    def load(self) -> None:
        super().load()
        layer = self.model.model.layers[self.layer]
        with torch.no_grad():
            if self.o_proj_scale is not None:
                layer.self_attn.o_proj.weight.mul_(float(self.o_proj_scale))
            if self.up_scale is not None:
                layer.mlp.up_proj.weight.mul_(float(self.up_scale))
        if self.operands:
            bf16_linears(self.model, getattr(torch, self.operands))
