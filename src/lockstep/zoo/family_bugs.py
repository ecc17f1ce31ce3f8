"""The bugs of the families families.py adds, each the mechanism of a public report (the
thread is its ``source``), with the step, tensor and diagnosis lockstep should give and, for
a bug that shows only past the sliding window, its condition."""

from __future__ import annotations

from .bug import Bug

__all__ = ["FAMILY_BUGS", "PAST_WINDOW"]

PAST_WINDOW = "the sequence is longer than the sliding window (8)"
_GH = "https://github.com/"

FAMILY_BUGS = (
    # -- Gemma 2 ------------------------------------------------------------------------------
    Bug("attn_softcap_missing",
        "The attention kernel is called with soft cap 0 (disabled), so Gemma 2's scores are "
        "never capped by cap * tanh(scores / cap).",
        _GH + "vllm-project/vllm-metal/issues/665", "prefill", 0, "layers.0.attn_heads",
        "softcap", families=("gemma2",)),
    Bug("query_pre_attn_scalar_ignored",
        "The scores are scaled by 1/sqrt(head_dim) instead of 1/sqrt(query_pre_attn_scalar).",
        _GH + "ggml-org/llama.cpp/pull/8444", "prefill", 0, "layers.0.attn_heads", "scale",
        families=("gemma2",)),
    Bug("window_layers_swapped",
        "The sliding window is put on the odd layers where Gemma 2 has it on the even ones "
        "(layer 0 attends to everything, layer 1 is windowed).",
        _GH + "huggingface/transformers/pull/31775", "prefill", 0, "layers.0.attn_heads",
        "window", families=("gemma2",), condition=PAST_WINDOW),
    Bug("window_all_layers",
        "Every layer gets the sliding window, the global (odd) layers too, because the "
        "interleaving pattern is not read from the config.",
        _GH + "vllm-project/vllm/pull/21863", "prefill", 0, "layers.1.attn_heads", "window",
        families=("gemma2",), condition=PAST_WINDOW),
    Bug("embed_scale_twice",
        "The embedding rows are multiplied by sqrt(hidden) twice: once by the embedding "
        "module that already folds the normalizer in, once more by the caller.",
        _GH + "TensorAuto/OpenTau/pull/179", "prefill", 0, "embed", "scale",
        families=("gemma2",)),
    Bug("norm_no_unit_offset",
        "Every RMSNorm scales by weight, Llama's convention, on Gemma weights that hold the "
        "scale minus one (1 + weight).",
        _GH + "linkedin/Liger-Kernel/issues/74", "prefill", 0, "layers.0.attn_norm", "op",
        families=("gemma2",)),
    Bug("gelu_exact",
        "The MLP gate uses exact (erf) GELU where Gemma's weights were trained with the tanh "
        "approximation (hidden_activation gelu_pytorch_tanh).",
        _GH + "vllm-project/vllm/issues/3411", "prefill", 0, "layers.0.act", "act",
        families=("gemma2",)),
    # -- Gemma 3 ------------------------------------------------------------------------------
    Bug("local_rope_global_theta",
        "The sliding layers turn RoPE with the global layers' base (1e6) instead of their own "
        "(rope_parameters['sliding_attention'], 10000).",
        _GH + "vllm-project/vllm/pull/29111", "prefill", 0, "layers.0.q_rope", "rope",
        families=("gemma3",)),
    Bug("norm_offset_twice",
        "The (1 + w) norm offset is added at run time to weights the converter already stored "
        "with the + 1, so every norm scales by (2 + w).",
        _GH + "kekzl/imp/pull/459", "prefill", 0, "layers.0.attn_norm", "op",
        families=("gemma3",)),
    # -- Mistral ------------------------------------------------------------------------------
    Bug("window_off_by_one",
        "The sliding-window mask lets each query see window + 1 keys (the key just past the "
        "window too).",
        _GH + "vllm-project/vllm/issues/3385", "prefill", 0, "layers.0.attn_heads", "window",
        families=("mistral",), condition=PAST_WINDOW),
    Bug("window_ignored",
        "The window never reaches the attention call: every layer attends to the whole causal "
        "history.",
        _GH + "unslothai/unsloth/pull/8253", "prefill", 0, "layers.0.attn_heads", "window",
        families=("mistral",), condition=PAST_WINDOW),
    Bug("window_decode_off_by_one",
        "Prefill masks the window right, but decode keeps window + 1 keys in its rotating "
        "cache, so a decode token past the window attends one key too many.",
        _GH + "ml-explore/mlx-lm/pull/390", "decode", 1, "layers.0.attn_heads", "window",
        families=("mistral",), condition=PAST_WINDOW + " at a decode step"),
    # -- Qwen2 --------------------------------------------------------------------------------
    Bug("qkv_bias_dropped",
        "The q/k/v projection biases are never applied: a config without attention_bias is "
        "read as false, where Qwen2 defaults it to true.",
        _GH + "EricLBuehler/candle-vllm/pull/167", "prefill", 0, "layers.0.q", "op",
        families=("qwen2",)),
    Bug("k_bias_not_loaded",
        "The loader fills the q and v parts of the qkv bias but never the k part, which keeps "
        "the engine's random init.",
        _GH + "vllm-project/vllm/pull/40160", "prefill", 0, "layers.0.k", "op",
        families=("qwen2",)),
    # -- Phi-3 --------------------------------------------------------------------------------
    Bug("partial_rotary_full",
        "partial_rotary_factor is dropped, so RoPE rotates the whole head instead of its first "
        "half.",
        _GH + "ml-explore/mlx-lm/pull/1698", "prefill", 0, "layers.0.q_rope", "rope",
        families=("phi3",)),
    Bug("partial_rotary_pairs",
        "Partial RoPE turns its pairs with frequencies theta^(-2i/head_dim) and partners "
        "(i, i + head_dim/2) over the whole head, instead of over the rotary width.",
        _GH + "pie-project/pie/pull/603", "prefill", 0, "layers.0.q_rope", "rope",
        families=("phi3",)),
    # -- Llama 3 (llama3 RoPE scaling, tied embeddings) ---------------------------------------
    Bug("llama3_rope_ignored",
        "The config's llama3 rope_scaling is parsed and never used: RoPE turns with the plain "
        "frequencies.",
        _GH + "lablup/mlxcel/issues/1355", "prefill", 0, "layers.0.q_rope", "rope",
        families=("llama3",)),
    Bug("lm_head_untied",
        "tie_word_embeddings is forced off, so the lm_head is a fresh zero matrix that no "
        "checkpoint tensor fills.",
        _GH + "GradientHQ/parallax/pull/444", "prefill", 0, "logits", "zeros",
        families=("llama", "llama3")),
    # -- Qwen3 with YaRN ----------------------------------------------------------------------
    Bug("yarn_attention_factor_missing",
        "YaRN's attention factor (0.1 ln(factor) + 1) collapses to 1, so cos and sin are not "
        "scaled.",
        _GH + "turboderp-org/exllamav3/issues/259", "prefill", 0, "layers.0.q_rope", "scale",
        families=("qwen3-yarn",)),
    Bug("yarn_mscale_squared",
        "The final YaRN attention factor is taken as a multiplier of the engine's own factor, "
        "so it is applied twice.",
        _GH + "sgl-project/sglang/pull/33558", "prefill", 0, "layers.0.q_rope", "scale",
        families=("qwen3-yarn",)),
    Bug("yarn_beta_swapped",
        "The YaRN ramp's ends are swapped: its low end comes from beta_slow and its high end "
        "from beta_fast.",
        _GH + "pytorch/torchtitan/pull/3787", "prefill", 0, "layers.0.q_rope", "rope",
        families=("qwen3-yarn",)),
)
