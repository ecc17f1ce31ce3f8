"""The zoo's mixture-of-experts family: Qwen3-MoE, and Qwen2-MoE for shared experts.

A sparse layer's ``feed_forward`` is a ``MoEBlock`` named as transformers names its parts, so
that one name table serves both: ``gate`` (the router, returning (logits, weights, ids) as
transformers 5 does), ``experts`` (``experts.{E}`` with ``w1``/``w3``/``w2``, and one
``act_fn`` call over every routed row, sorted by expert as transformers' grouped_mm sorts
them), and for Qwen2-MoE ``shared_expert`` (w1/w3/w2) with its sigmoid ``shared_expert_gate``.

Qwen2-MoE stands in for a DeepSeek-style layout: transformers has DeepSeek-V2 and V3, but their
multi-head latent attention is not in the zoo; Qwen2-MoE has the shared expert beside the
routed ones and, with ``mlp_only_layers=[0]``, DeepSeek's dense first layer (docs/zoo.md).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import UsageError
from .config import MOE_FAMILIES, ModelArgs
from .layers import FeedForward
from .lora import LoRALinear
from .model import Transformer
from .weights import assemble, zoo_to_hf

__all__ = ["MOE_FAMILIES", "MoEArgs", "MoEBlock", "build_moe", "tiny_moe_model",
           "SWAPPED_EXPERT", "NAN_EXPERT", "CAPACITY_FACTOR"]

SWAPPED_EXPERT = 3  #: the expert whose gate and up are swapped (bug moe_gate_up_swapped)
NAN_EXPERT = 5  #: the layer-1 expert that gets a NaN LoRA (bug moe_nan_expert_lora)
CAPACITY_FACTOR = 1.0  #: rows an expert takes, times its even share (bug moe_capacity_drop)


@dataclass(frozen=True)
class MoEArgs(ModelArgs):
    """ModelArgs plus the experts: how many, how many per token, their sizes, which layers."""

    n_experts: int = 0
    top_k: int = 0
    norm_topk: bool = False  #: renormalize the top-k weights to sum to 1
    moe_dim: int = 0  #: a routed expert's intermediate size
    shared_dim: int = 0  #: the shared expert's intermediate size (0: none)
    dense_layers: tuple[int, ...] = ()  #: layers with a dense MLP instead of experts

    @property
    def qk_norm(self) -> bool:
        return self.family == "qwen3_moe"

    @classmethod
    def from_config(cls, config: Mapping[str, Any], bug: str | None = None) -> MoEArgs:
        family = config.get("model_type")
        if family not in MOE_FAMILIES:
            raise UsageError(f"the zoo's MoE family runs {' and '.join(MOE_FAMILIES)}; this "
                             f"model is {family!r}")
        # the dense parts read as a Qwen3 (QK-norm) or Llama-with-bias (Qwen2) config
        dense = dict(config, model_type="qwen3" if family == "qwen3_moe" else "llama",
                     attention_bias=bool(config.get("qkv_bias", config.get("attention_bias"))))
        base = ModelArgs.from_config(dense, bug)
        step = int(config.get("decoder_sparse_step") or 1)
        only = set(config.get("mlp_only_layers") or ())
        dense_layers = tuple(i for i in range(base.n_layers) if i in only or (i + 1) % step)
        return cls(**{**base.__dict__, "family": family},
                   n_experts=int(config.get("num_experts") or config["num_local_experts"]),
                   top_k=int(config["num_experts_per_tok"]),
                   norm_topk=bool(config.get("norm_topk_prob", False)),
                   moe_dim=int(config["moe_intermediate_size"]),
                   shared_dim=int(config.get("shared_expert_intermediate_size") or 0),
                   dense_layers=dense_layers)


class Router(nn.Module):
    """Router logits, softmax, top-k, optional renormalization: (logits, weights, ids)."""

    def __init__(self, args: MoEArgs) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(args.n_experts, args.dim))
        self.top_k, self.n_experts, self.norm_topk = args.top_k, args.n_experts, args.norm_topk
        self.bug = args.bug

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        logits = F.linear(x, self.weight)  # (tokens, experts)
        if self.bug == "moe_softmax_after_topk":
            top, ids = torch.topk(logits, self.top_k, dim=-1)  # the softmax sees k logits
            weights = torch.softmax(top, dim=-1, dtype=torch.float)
        else:
            probs = torch.softmax(logits, dim=-1, dtype=torch.float)
            weights, ids = torch.topk(probs, self.top_k, dim=-1)
            if self.norm_topk and self.bug != "moe_topk_not_normalized":
                weights = weights / weights.sum(dim=-1, keepdim=True)
        if self.bug == "moe_expert_offset":
            ids = (ids + 1) % self.n_experts  # a 1-based expert index used as 0-based
        return logits, weights.to(logits.dtype), ids


class Expert(nn.Module):
    """One routed expert's weights (SwiGLU: w1 gate, w3 up, w2 down), LoRA-able."""

    def __init__(self, dim: int, hidden_dim: int) -> None:
        super().__init__()
        self.w1 = LoRALinear(dim, hidden_dim)
        self.w2 = LoRALinear(hidden_dim, dim)
        self.w3 = LoRALinear(dim, hidden_dim)


class Experts(nn.Module):
    """The routed experts, run as transformers' grouped_mm runs them: the (token, k) rows
    sorted by expert, each expert on its own rows, weighted, summed back per token."""

    def __init__(self, args: MoEArgs) -> None:
        super().__init__()
        for e in range(args.n_experts):  # named 0, 1, ... as transformers 4 names them
            self.add_module(str(e), Expert(args.dim, args.moe_dim))
        self.n_experts = args.n_experts
        self.act_fn = nn.SiLU()
        self.top_k = args.top_k
        self.bug = args.bug

    def __getitem__(self, index: int) -> Expert:
        expert = self._modules[str(index)]
        assert isinstance(expert, Expert)
        return expert

    def forward(self, x: Tensor, ids: Tensor, weights: Tensor) -> Tensor:
        sorted_ids, perm = torch.sort(ids.reshape(-1))
        rows = x[perm // self.top_k]
        runs = [(int(e), sorted_ids == e) for e in torch.unique(sorted_ids)]
        gate = rows.new_empty(rows.shape[0], self[0].w1.out_features)
        up = torch.empty_like(gate)
        for e, mine in runs:
            w1, w3 = self[e].w1, self[e].w3
            if self.bug == "moe_gate_up_swapped" and e == SWAPPED_EXPERT:
                w1, w3 = w3, w1  # a loader that reads gate_up_proj's halves the other way
            gate[mine], up[mine] = w1(rows[mine]), w3(rows[mine])
        act = self.act_fn(gate) * up
        out = torch.zeros_like(rows)
        for e, mine in runs:
            out[mine] = self[e].w2(act[mine])
        if self.bug == "moe_capacity_drop":
            capacity = math.ceil(CAPACITY_FACTOR * ids.numel() / self.n_experts)
            for _, mine in runs:  # rows past an expert's capacity are dropped, not computed
                out[mine.nonzero().flatten()[capacity:]] = 0
        out = out * weights.reshape(-1)[perm, None]
        return torch.zeros_like(x).index_add_(0, perm // self.top_k, out)


class MoEBlock(nn.Module):
    """Router, routed experts and (Qwen2-MoE) a sigmoid-gated shared expert."""

    def __init__(self, args: MoEArgs) -> None:
        super().__init__()
        self.gate = Router(args)
        self.experts = Experts(args)
        self.shared_expert = FeedForward(args.dim, args.shared_dim) if args.shared_dim else None
        self.shared_expert_gate = nn.Linear(args.dim, 1, bias=False) if args.shared_dim else None
        self.bug = args.bug

    def forward(self, x: Tensor) -> Tensor:
        flat = x.reshape(-1, x.shape[-1])
        shared = self.shared_expert(flat) if self.shared_expert is not None else None
        _, weights, ids = self.gate(flat)
        out = self.experts(flat, ids, weights)
        if shared is not None and self.shared_expert_gate is not None:
            shared = torch.sigmoid(self.shared_expert_gate(flat)) * shared
            if self.bug != "moe_no_shared_expert":
                out = out + shared
        return out.reshape(x.shape)


# -- loading ---------------------------------------------------------------------------------
_MOE_PARTS = {"w1": "gate_proj", "w2": "down_proj", "w3": "up_proj"}


def _source(name: str) -> str:
    """The transformers name of a zoo MoE parameter (others: ``zoo_to_hf``)."""
    parts = name.split(".")
    if len(parts) > 3 and parts[2] == "feed_forward" and parts[3] in (
            "gate", "experts", "shared_expert", "shared_expert_gate"):
        rest = [_MOE_PARTS.get(p, p) for p in parts[3:]]
        return ".".join(["model.layers", parts[1], "mlp", *rest])
    return zoo_to_hf(name)


def _expert_tensor(tensors: Mapping[str, Tensor], source: str) -> Tensor | None:
    """A per-expert weight from a fused checkpoint (``experts.gate_up_proj`` (E, 2I, D),
    ``experts.down_proj`` (E, D, I)), for checkpoints saved without the per-expert split."""
    head, _, tail = source.partition(".experts.")
    index, _, part = tail.partition(".")
    part = part.removesuffix(".weight")
    if not index.isdigit():
        return None
    e = int(index)
    if part == "down_proj" and f"{head}.experts.down_proj" in tensors:
        return tensors[f"{head}.experts.down_proj"][e]
    fused = tensors.get(f"{head}.experts.gate_up_proj")
    if fused is None or part not in ("gate_proj", "up_proj"):
        return None
    half = fused.shape[1] // 2
    return fused[e, :half] if part == "gate_proj" else fused[e, half:]


def _lookup(tensors: Mapping[str, Tensor]) -> Callable[[str], tuple[str, Tensor | None]]:
    """The checkpoint tensor of a zoo parameter, per-expert or cut from a fused expert stack."""
    def lookup(name: str) -> tuple[str, Tensor | None]:
        source = _source(name)
        value = tensors.get(source)
        if value is None and ".experts." in source:
            value = _expert_tensor(tensors, source)
        return source, value

    return lookup


def build_moe(config: Mapping[str, Any], tensors: Mapping[str, Tensor], *,
              bug: str | None = None, dtype: torch.dtype = torch.float32, device: str = "cpu",
              seed: int = 0, vm: bool = False) -> Transformer:
    """A zoo Transformer whose sparse layers are ``MoEBlock``s, with the checkpoint's weights."""
    args = MoEArgs.from_config(config, bug)
    if bug == "moe_nan_expert_lora" and (args.n_layers < 2 or 1 in args.dense_layers):
        raise UsageError(f"zoo bug {bug!r} is in layer 1's experts; this model has none")
    model = Transformer(args)
    for i, layer in enumerate(model.layers):
        if i not in args.dense_layers:
            layer.feed_forward = MoEBlock(args)
    nan = f"layers.1.feed_forward.experts.{NAN_EXPERT}.w2" if bug == "moe_nan_expert_lora" \
        else None
    return assemble(model, tensors, dtype=dtype, device=device, seed=seed, vm=vm, nan_adapter=nan,
                    lookup=_lookup(tensors))


# -- the tiny models -------------------------------------------------------------------------
def _near_ties(model: Any, generator: torch.Generator) -> None:
    """Make experts (0, 1), (2, 3), ... near-twins in every router: their logits differ by
    about 1e-4, so a bfloat16 router flips some choices where float32 does not (with top 3 of
    8, the third and fourth choice are always a pair of twins)."""
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("mlp.gate.weight"):
                twin = param[0::2] + 1e-5 * torch.randn(param[0::2].shape, generator=generator)
                param[1::2] = twin


def tiny_moe_model(family: str, directory: Path) -> Path:
    """A 2-layer random transformers MoE model, saved once as a model directory.

    Qwen3-MoE: 8 experts, top 3, renormalized weights, QK-norm. Qwen2-MoE: 8 experts, top 3,
    weights not renormalized, a shared expert, q/k/v biases, layer 0 dense (DeepSeek's
    first_k_dense_replace). Both routers hold near-tied expert pairs (see ``_near_ties``)."""
    if (directory / "config.json").is_file():
        return directory
    from transformers import (
        Qwen2MoeConfig,
        Qwen2MoeForCausalLM,
        Qwen3MoeConfig,
        Qwen3MoeForCausalLM,
    )

    torch.manual_seed(0)
    common: dict[str, Any] = dict(
        vocab_size=320, hidden_size=64, intermediate_size=96, moe_intermediate_size=32,
        num_experts=8, num_experts_per_tok=3, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=128, rope_theta=1000000.0)
    if family == "qwen3_moe":
        model: Any = Qwen3MoeForCausalLM(Qwen3MoeConfig(
            **{**common, "head_dim": 16, "norm_topk_prob": True}))
    elif family == "qwen2_moe":
        model = Qwen2MoeForCausalLM(Qwen2MoeConfig(
            shared_expert_intermediate_size=48, norm_topk_prob=False, mlp_only_layers=[0],
            **common))
    else:
        raise UsageError(f"no tiny MoE model of family {family!r}")
    _near_ties(model, torch.Generator().manual_seed(1))
    model.save_pretrained(directory)
    return directory
