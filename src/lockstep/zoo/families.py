"""The zoo's model families beyond Llama and Qwen3: what each adds, read from its transformers
config, and the tiny random checkpoint of each that the zoo runs.

Each zoo family, the transformers model it is checked against, and what it adds:

- ``gemma2`` (Gemma2ForCausalLM): attention soft cap, √hidden embedding scale,
  query_pre_attn_scalar, four norms per layer with (1 + w), tanh GELU, a sliding window on
  even layers, a final logit soft cap;
- ``gemma3`` (Gemma3ForCausalLM): Gemma 2's block without soft caps, plus per-head q/k norms
  with (1 + w) and a RoPE base of its own on the sliding layers
  (``rope_parameters["sliding_attention"]``);
- ``mistral`` (MistralForCausalLM): a sliding window on every layer;
- ``qwen2`` (Qwen2ForCausalLM): q/k/v projection biases;
- ``phi3`` (Phi3ForCausalLM): fused ``qkv_proj`` and ``gate_up_proj``, partial rotary;
- ``llama3`` (LlamaForCausalLM): ``llama3`` RoPE scaling, tied embeddings (Llama 3.2);
- ``qwen3-yarn`` (Qwen3ForCausalLM): YaRN RoPE scaling and its attention factor.

The constants are scaled down so that every effect shows on the zoo's 9-token prompt: a window
of 8, soft caps near the scores' size, an original context of 16 positions.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from ..errors import UsageError

__all__ = ["FamilyArgs", "family_args", "family_of", "tiny_family_model", "NEW_FAMILIES",
           "RENAMES", "rope_parameters"]

#: zoo family -> (transformers model_type, how its rope is scaled)
NEW_FAMILIES = ("gemma2", "gemma3", "mistral", "qwen2", "phi3", "llama3", "qwen3-yarn")


@dataclass(frozen=True)
class FamilyArgs:
    """What a family adds to the Llama block (the defaults: nothing)."""

    sliding_window: int | None = None  #: keys a query sees on a sliding layer, itself included
    sliding_layers: tuple[int, ...] = ()  #: the layers with the window
    attn_softcap: float | None = None  #: scores -> cap * tanh(scores / cap)
    final_softcap: float | None = None  #: the same on the logits, after the lm_head
    query_scale: float | None = None  #: the scores' scale (default head_dim ** -0.5)
    embed_scale: float | None = None  #: the embedding rows' factor (Gemma: √hidden)
    norm_offset: bool = False  #: norms scale by (1 + weight) (Gemma)
    sandwich_norms: bool = False  #: norms after attention and after the MLP too (Gemma 2)
    act: str = "silu"  #: the MLP's gate activation: "silu" or "gelu_tanh"
    rotary_dim: int | None = None  #: the rotated width, when not the whole head (partial)
    rope_scaling: Mapping[str, Any] = field(default_factory=dict)  #: llama3 or yarn
    fused: bool = False  #: fused qkv and gate_up projections (Phi-3)
    qk_norm: bool = False  #: per-head RMS norms of Q and K before RoPE (Gemma 3; Qwen3's own)
    local_rope_theta: float | None = None  #: the RoPE base of the sliding layers (Gemma 3)


def family_of(config: Mapping[str, Any]) -> str:
    """The zoo family of a transformers config."""
    model_type = config.get("model_type")
    kind = rope_parameters(config).get("rope_type", rope_parameters(config).get("type"))
    if model_type == "llama" and kind == "llama3":
        return "llama3"
    if model_type == "qwen3" and kind == "yarn":
        return "qwen3-yarn"
    if model_type == "gemma3_text":
        return "gemma3"
    return str(model_type)


def rope_parameters(config: Mapping[str, Any],
                    layer_type: str = "full_attention") -> Mapping[str, Any]:
    """The config's RoPE parameters (``rope_parameters``, or ``rope_scaling`` of older
    transformers); where they are given per layer type (Gemma 3), those of ``layer_type``."""
    params = config.get("rope_parameters") or config.get("rope_scaling") or {}
    if isinstance(params.get(layer_type), Mapping):
        return params[layer_type]
    return params



def _window_layers(config: Mapping[str, Any], n_layers: int) -> tuple[int, ...]:
    types = config.get("layer_types")
    if types:
        return tuple(i for i, t in enumerate(types) if t == "sliding_attention")
    return tuple(range(n_layers))


def family_args(config: Mapping[str, Any], family: str, head_dim: int) -> FamilyArgs:
    """The family's additions, from its config; a feature the zoo lacks is a usage error."""
    n_layers = int(config["num_hidden_layers"])
    act = config.get("hidden_activation") or config.get("hidden_act") or "silu"
    if act not in ("silu", "gelu_pytorch_tanh") or config.get("mlp_bias"):
        raise UsageError("the zoo engine runs SwiGLU or tanh-GELU gated MLPs without bias only")
    rope = dict(rope_parameters(config))
    kind = rope.get("rope_type", rope.get("type", "default"))
    if kind not in ("default", "llama3", "yarn"):
        raise UsageError(f"the zoo engine runs plain, llama3 and YaRN RoPE; this model uses "
                         f"{kind!r}")
    window = config.get("sliding_window")
    if family in ("llama", "qwen3", "llama3", "qwen3-yarn", "qwen2", "phi3") and (
            config.get("use_sliding_window") or (family == "phi3" and window)):
        raise UsageError("the zoo engine has a sliding window for Gemma 2, Gemma 3 and Mistral "
                         "only")
    partial = float(rope.get("partial_rotary_factor") or config.get("partial_rotary_factor")
                    or 1.0)
    args: dict[str, Any] = dict(
        act="gelu_tanh" if act == "gelu_pytorch_tanh" else "silu",
        rope_scaling=rope if kind != "default" else {},
        rotary_dim=int(head_dim * partial) if partial < 1 else None)
    if family in ("gemma2", "gemma3"):
        args.update(
            sliding_window=window, sliding_layers=_window_layers(config, n_layers),
            attn_softcap=config.get("attn_logit_softcapping"),
            final_softcap=config.get("final_logit_softcapping"),
            query_scale=float(config["query_pre_attn_scalar"]) ** -0.5,
            embed_scale=math.sqrt(int(config["hidden_size"])), norm_offset=True,
            sandwich_norms=True)
    if family == "gemma3":
        local = rope_parameters(config, "sliding_attention")
        args.update(qk_norm=True, local_rope_theta=float(
            local.get("rope_theta") or config.get("rope_local_base_freq") or 10000.0))
    elif family == "mistral" and window:
        args.update(sliding_window=int(window), sliding_layers=tuple(range(n_layers)))
    elif family == "phi3":
        args.update(fused=True)
    return FamilyArgs(**args)


#: zoo name -> transformers name, tried before the Llama renames (weights.py)
RENAMES: dict[str, tuple[tuple[str, str], ...]] = {
    "gemma2": (
        (r"layers\.(\d+)\.ffn_norm\.", r"model.layers.\1.pre_feedforward_layernorm."),
        (r"layers\.(\d+)\.post_attention_norm\.", r"model.layers.\1.post_attention_layernorm."),
        (r"layers\.(\d+)\.post_ffn_norm\.", r"model.layers.\1.post_feedforward_layernorm."),
    ),
    "phi3": (
        (r"layers\.(\d+)\.attention\.qkv\.", r"model.layers.\1.self_attn.qkv_proj."),
        (r"layers\.(\d+)\.feed_forward\.w13\.", r"model.layers.\1.mlp.gate_up_proj."),
    ),
}
RENAMES["gemma3"] = RENAMES["gemma2"]


# -- the tiny checkpoints --------------------------------------------------------------------
_SIZES: dict[str, Any] = dict(
    vocab_size=320, hidden_size=128, intermediate_size=176, num_hidden_layers=2,
    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)


def _config(family: str) -> Any:
    import transformers as tf

    if family == "gemma2":
        # query_pre_attn_scalar differs from head_dim (as Gemma 2 27B's does), small caps
        return tf.Gemma2Config(head_dim=32, query_pre_attn_scalar=24, sliding_window=8,
                               attn_logit_softcapping=1.0, final_logit_softcapping=2.0,
                               initializer_range=0.08, **_SIZES)
    if family == "gemma3":
        # layer 0 slides (RoPE base 10000), layer 1 is global (base 1e6), as 5:1 in the real
        # models; no soft caps (Gemma 3 has none)
        return tf.Gemma3TextConfig(
            head_dim=32, query_pre_attn_scalar=24, sliding_window=8,
            layer_types=["sliding_attention", "full_attention"], initializer_range=0.08,
            rope_parameters={"sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
                             "full_attention": {"rope_type": "default", "rope_theta": 1000000.0}},
            **_SIZES)
    if family == "mistral":
        return tf.MistralConfig(**{**_SIZES, "sliding_window": 8, "rope_theta": 1000000.0})
    if family == "qwen2":
        return tf.Qwen2Config(**{**_SIZES, "rope_theta": 1000000.0})
    if family == "phi3":
        return tf.Phi3Config(**{**_SIZES, "partial_rotary_factor": 0.5, "pad_token_id": 0,
                                "bos_token_id": 1, "eos_token_id": 2})
    if family == "llama3":
        return tf.LlamaConfig(tie_word_embeddings=True, rope_parameters=dict(
            rope_type="llama3", rope_theta=500000.0, factor=8.0, low_freq_factor=1.0,
            high_freq_factor=4.0, original_max_position_embeddings=16), **_SIZES)
    if family == "qwen3-yarn":
        return tf.Qwen3Config(head_dim=64, rope_parameters=dict(
            rope_type="yarn", rope_theta=1000000.0, factor=8.0,
            original_max_position_embeddings=16), **_SIZES)
    raise UsageError(f"no tiny model for the zoo family {family!r}")


def tiny_family_model(family: str, directory: Path) -> Path:
    """A 2-layer random model of the family, saved once as a model directory. Norm weights
    and biases are drawn at random too (transformers starts them at 1, 0 or 0), so that a
    norm convention or a dropped bias shows."""
    if (directory / "config.json").is_file():
        return directory
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(_config(family))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name:
                param.normal_(0.0 if family.startswith("gemma") else 1.0, 0.1)
            elif name.endswith(".bias"):
                param.normal_(0.0, 0.5)
    model.save_pretrained(directory)
    return directory
