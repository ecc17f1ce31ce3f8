"""The bug zoo's registry: every bug the mini engine can switch on, and what lockstep should say.

Each bug lives in the engine's own code path, behind a readable ``if self.bug == "name"``
check, so that ``ZooEngine(spec, path, bug="name")`` runs the same engine with exactly one
thing wrong. The expectations (first divergent step, canonical tensor, diagnosis class) are
what lockstep should report when the zoo is compared with transformers on the same weights.
"""

from __future__ import annotations

from ..errors import UsageError
from .batch_bugs import BATCH_BUGS
from .boundary_bugs import BOUNDARY_BUGS
from .bug import DIAGNOSES, Bug
from .family_bugs import FAMILY_BUGS

__all__ = ["Bug", "BUGS", "DIAGNOSES", "get_bug"]

_SEED_000 = "seeds/000_bb3755e1f931925d.txt (mini vLLM checklist)"
_SEED_001 = "seeds/001_c36c40d1cc5e13e0.txt (fused decode VM vs torch)"
_SEED_003 = "seeds/003_c05f1e921ed95932.txt (hybrid MoE + LoRA stack)"
_SEED_004 = "seeds/004_32441b6e12ad34f7.txt (Rust/CUDA engine on GGUF)"


_ALL = (
    Bug("swapped_args",
        "The runner calls the model as model(positions, input_ids) while it is declared "
        "model(input_ids, positions), so the embedding looks up positions and RoPE rotates by "
        "token ids.",
        _SEED_000 + ", section 1", "prefill", 0, "input_ids", "embedding"),
    Bug("wrong_decode_token",
        "Decode feeds the token before the last one in the sequence's history "
        "(token_ids[-2]) instead of the last one, also when the tokens are teacher-forced.",
        _SEED_000 + ", checklist item 4", "decode", 1, "input_ids", "decode"),
    Bug("wrong_decode_position",
        "A decode token gets position len(seq) instead of len(seq) - 1, so RoPE rotates it one "
        "place too far (its KV slot is still right).",
        _SEED_000 + ", checklist item 6", "decode", 1, "layers.0.q_rope", "decode"),
    Bug("wrong_kv_slot",
        "Decode writes the new token's K/V one slot past its own (the last page's fill count "
        "without the - 1), so attention reads an empty slot where that token should be.",
        _SEED_000 + ", checklist item 5", "decode", 1, "layers.0.attn_heads", "decode"),
    Bug("blocked_qk_norm",
        "The decode VM's QK-norm computes the RMS over each 16-element block of the fused QKV "
        "output instead of over the whole head (forces vm=True; invisible when head_dim is 16).",
        _SEED_001, "decode", 1, "layers.0.q_norm", "blocked_norm", families=("qwen3",)),
    Bug("lm_head_layout",
        "The lm_head GEMM reads the row-major (vocab, hidden) weight as if it were "
        "(hidden, vocab), the wrong transpose and leading dimension of a cuBLAS call.",
        _SEED_004, "prefill", 0, "logits", "logits"),
    Bug("rope_interleaved",
        "RoPE rotates adjacent pairs (Meta's original and llama.cpp's convention) where the "
        "transformers weights expect half-split pairs.",
        "https://github.com/huggingface/transformers/issues/25199",
        "prefill", 0, "layers.0.q_rope", "rope"),
    Bug("bad_temperature",
        "The sampler divides the logits by the temperature before checking for greedy "
        "decoding, so temperature 0 turns them into +-inf and argmax picks the first "
        "positive logit.",
        "https://github.com/ggml-org/ggml/issues/37", "prefill", 0, "tokens", "sampling"),
    Bug("token_as_tensor",
        "Each chosen token is kept as a view into the sampler's reused output buffer instead "
        "of a Python int, so every stored token turns into the latest one: the tensors and the "
        "fed tokens stay right, the returned tokens are all the last step's.",
        _SEED_000 + ", checklist item 8", "decode", 0, "tokens", "sampling"),
    Bug("layer_not_loaded",
        "The loader skips layer 1's weights, which keep the engine's seeded random init.",
        _SEED_000 + ", checklist item 2", "prefill", 0, "layers.1.attn_norm", "op"),
    Bug("nan_adapter",
        "A LoRA adapter on layer 1's wq whose B matrix is all NaN (a training run that "
        "diverged) is applied at load time.",
        _SEED_003 + ", bug 5", "prefill", 0, "layers.1.q", "nan"),
    Bug("heads_no_transpose",
        "The attention output (batch, heads, seq, head_dim) is reshaped straight to "
        "(batch, seq, heads * head_dim) without moving the head axis (invisible for one token).",
        "https://github.com/huggingface/transformers/pull/34942",
        "prefill", 0, "layers.0.attn_heads", "layout"),
    Bug("gqa_tiled_kv",
        "Grouped-query attention repeats the KV heads by tiling (0, 1, 0, 1) instead of "
        "interleaving (0, 0, 1, 1), so query heads attend with the wrong KV head.",
        "https://github.com/onnx/onnx/pull/7274", "prefill", 0, "layers.0.attn_heads", "gqa"),
    Bug("norm_unit_offset",
        "Every RMSNorm scales by (1 + weight), Gemma's convention, on Llama/Qwen3 weights that "
        "already hold the whole scale.",
        "https://github.com/kekzl/imp/pull/459", "prefill", 0, "layers.0.attn_norm", "op"),
    Bug("decode_attn_zeros",
        "Decode attention is given a context length of 0, so the kernel skips the sequence and "
        "leaves its zero-initialised output buffer unwritten.",
        "https://github.com/vllm-project/vllm/pull/37442",
        "decode", 1, "layers.0.attn_heads", "zeros"),
    Bug("stale_hidden",
        "Decode reads the final hidden state from a buffer only prefill writes, so the final "
        "norm and the logits repeat the prefill's last position at every step.",
        "https://github.com/xberg-io/xberg/issues/1210", "decode", 1, "final_norm", "stale"),
    Bug("rope_theta_default",
        "RoPE ignores the config's rope_theta and uses the default base 10000 (a no-op for "
        "models whose rope_theta is 10000).",
        "https://github.com/vllm-project/vllm/pull/9503",
        "prefill", 0, "layers.0.q_rope", "rope"),
    Bug("prefill_no_causal_mask",
        "Attention applies the causal mask only when no KV cache is attached, and the engine "
        "always attaches one, so prefill tokens attend to later tokens.",
        "https://github.com/Mikyx-1/TinyLLM/issues/17",
        "prefill", 0, "layers.0.attn_heads", "mask"),
)

_QWEN3_MOE, _QWEN2_MOE, _MOE = ("qwen3_moe",), ("qwen2_moe",), ("qwen3_moe", "qwen2_moe")
_SEED_002 = "seeds/002_8567fc7f63a3946d.txt (InfiniLM's Qwen3-MoE tests)"
#: the mixture-of-experts family's bugs (moe.py); Qwen2-MoE's layer 0 is dense
_MOE_BUGS = (
    Bug("moe_topk_not_normalized",
        "The router leaves the top-k weights as softmax gave them where the config asks "
        "for them to be renormalized to sum to 1 (norm_topk_prob).",
        "https://github.com/huggingface/transformers/issues/41151", "prefill", 0,
        "layers.0.expert_weights", "moe", families=_QWEN3_MOE),
    Bug("moe_softmax_after_topk",
        "The router takes the top-k logits first and the softmax over those k alone, so the "
        "weights sum to 1 where the model expects a share of the softmax over every expert.",
        "https://github.com/QwenLM/Qwen3/issues/687", "prefill", 0, "layers.1.expert_weights",
        "moe", families=_QWEN2_MOE),
    Bug("moe_expert_offset",
        "The chosen expert ids are off by one (a 1-based index used as 0-based), so every "
        "token runs the experts next to the ones its router chose.",
        _SEED_002, "prefill", 0, "layers.0.expert_ids", "moe", families=_QWEN3_MOE),
    Bug("moe_no_shared_expert",
        "The shared expert is computed but left out of the sum: the MLP output is the routed "
        "experts' alone.",
        _SEED_003, "prefill", 0, "layers.1.mlp_out", "moe", families=_QWEN2_MOE),
    Bug("moe_gate_up_swapped",
        "Expert 3 reads its gate and up projections the other way round (the halves of a fused "
        "gate_up_proj swapped for one expert).",
        _SEED_003, "prefill", 0, "layers.0.experts.gate_act", "moe", families=_QWEN3_MOE),
    Bug("moe_capacity_drop",
        "Each expert takes at most its even share of the (token, expert) rows, and the rows "
        "past that capacity are dropped: prefill tokens lose an expert's output.",
        _SEED_002, "prefill", 0, "layers.0.experts_out", "moe", families=_QWEN3_MOE),
    Bug("moe_nan_expert_lora",
        "A LoRA adapter on layer 1's expert 5 down projection whose B matrix is all NaN is "
        "applied at load time.",
        _SEED_003 + ", bug 5", "prefill", 0, "layers.1.experts_out", "nan", families=_MOE),
)

#: every bug, by name, in the order of the docs' table
BUGS: dict[str, Bug] = {bug.name: bug for bug in _ALL + FAMILY_BUGS + _MOE_BUGS}


def get_bug(name: str | None, family: str | None = None) -> Bug | None:
    """The bug called ``name`` (None for none), checked against the model family."""
    if name is None or name == "":
        return None
    bug = BUGS.get(name) or BATCH_BUGS.get(name)
    if bug is None:
        raise UsageError(f"unknown zoo bug {name!r}; choose one of "
                         f"{', '.join([*BUGS, *BATCH_BUGS])} (the boundary bugs "
                         f"{', '.join(BOUNDARY_BUGS)} are for a zoo: engine and lockstep "
                         "fuzz, not the zoo's table)")
    if family is not None and family not in bug.families:
        raise UsageError(f"zoo bug {name!r} needs a {' or '.join(bug.families)} model; "
                         f"this one is {family}")
    return bug
