"""Name tables: each engine's recorded names mapped to one canonical name per transformer op.

Canonical names (``layers.N.<op>`` for per-layer ops) are what two engines' records are paired
by when their own names differ. A rule can also name a layout transform (align/transforms.py)
that brings its engine's tensor into the canonical layout: the layout transformers uses for
that op, except that per-head tensors are (batch, tokens, heads, head_dim), the order of the
Q/K/V projections' features (transformers' RoPE outputs and Gemma 3's q/k norms are
(batch, heads, tokens, head_dim) and carry a transform). Size-1 dims never matter.

| canonical | meaning |
|---|---|
| ``input_ids`` | token ids fed at this step |
| ``tok_embed`` | token embedding rows, where they differ from ``embed`` (GPT-2) |
| ``pos_embed`` | learned position embeddings (GPT-2) |
| ``embed`` | the hidden state entering the first layer (Gemma: scaled by sqrt(hidden)) |
| ``rope_cos`` / ``rope_sin`` | the RoPE tables of this step's positions |
| ``layers.N.attn_norm`` | the norm before attention |
| ``layers.N.qkv`` | a fused Q/K/V projection (Phi-3 ``qkv_proj``, GPT-2 ``c_attn``) |
| ``layers.N.q`` / ``.k`` / ``.v`` | Q, K, V projections (before any norm or RoPE) |
| ``layers.N.q_norm`` / ``.k_norm`` | per-head norms of Q and K (Qwen3, Gemma 3) |
| ``layers.N.q_rope`` / ``.k_rope`` | Q and K after RoPE |
| ``layers.N.attn_probs`` | attention probabilities (batch, heads, tokens, keys) |
| ``layers.N.attn_heads`` | attention output, heads merged, before the output projection |
| ``layers.N.attn_out`` | after the output projection |
| ``layers.N.attn_post_norm`` | the norm of the attention output (Gemma) |
| ``layers.N.attn_residual`` | residual sum before the MLP |
| ``layers.N.mlp_norm`` | the norm before the MLP |
| ``layers.N.gate_up`` | a fused gate and up projection (Phi-3 ``gate_up_proj``) |
| ``layers.N.gate`` / ``.up`` | MLP gate and up projections (GPT-2's ``c_fc`` is ``up``) |
| ``layers.N.gate_act`` | the activation of the gate alone (silu(gate)) |
| ``layers.N.act`` | the input of the down projection (SwiGLU: silu(gate) * up) |
| ``layers.N.down`` | MLP down projection |
| ``layers.N.router`` | MoE router logits (tokens, experts) |
| ``layers.N.expert_weights`` / ``.expert_ids`` | the chosen experts' weights and ids |
| ``layers.N.experts.E.<op>`` | expert E's ``gate``, ``up``, ``act``, ``down`` (its tokens only) |
| ``layers.N.experts.gate_act`` | silu(gate) of every routed (token, expert) row at once |
| ``layers.N.experts_out`` | the routed experts' weighted sum |
| ``layers.N.shared_expert.<op>`` | the shared expert's ``gate``, ``gate_act``, ``up``, ``act``, |
| | ``down`` and ``out`` |
| ``layers.N.shared_expert_gate`` | the shared expert's gate logit |
| ``layers.N.shared_expert_gate_prob`` | its sigmoid (llama.cpp's ``ffn_shexp_gate``) |
| ``layers.N.mlp_out`` | the MLP block's output (dense: ``down``'s values; MoE: the experts' |
| | sum plus the shared expert) |
| ``layers.N.mlp_post_norm`` | the norm of the MLP output (Gemma) |
| ``layers.N.out`` | layer output (residual sum after the MLP) |
| ``final_norm`` | the last norm |
| ``logits`` | the logits |

Some records repeat a tensor another record of the same dump already holds (an identity
dropout, a wrapper module's output); their rule is an *alias*: the same canonical name,
paired only when the first record is missing.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Iterable, Mapping, NamedTuple

__all__ = ["Rule", "NameTable", "TABLES", "detect_table", "TRANSFORMERS_LLAMA",
           "TRANSFORMERS_PHI3", "TRANSFORMERS_GEMMA", "TRANSFORMERS_GPT2", "LLAMA_CPP",
           "LLAMA_CPP_QWEN_MOE",
           "LLAMA_REFERENCE", "VLLM"]

Hit = tuple[str, "str | None", "str | None"]  # (canonical, transform, counterpart transform)


@dataclass(frozen=True)
class Rule:
    """One engine name pattern and the canonical name it stands for."""

    pattern: re.Pattern[str]  #: full match on the recorded name; groups fill ``canonical``
    canonical: str  #: template, e.g. "layers.{0}.q"
    transform: str | None = None  #: layout transform to the canonical layout (transforms.py)
    #: template (filled like ``canonical``) for the other side's tensor, applied after that
    #: side's own transform: "block(16, {1})" pairs a 16-element block with the whole tensor
    counterpart_transform: str | None = None
    alias: bool = False  #: repeats a tensor an earlier record holds under the same name
    #: added to the layer (the first group): a fused-residual norm's residual output is the
    #: previous layer's output
    shift: int = 0

    def match(self, recorded: str) -> Hit | None:
        """(canonical, transform, counterpart transform) if the rule knows the name."""
        m = self.pattern.fullmatch(recorded)
        if m is None:
            return None
        groups = m.groups()
        if self.shift:
            if int(groups[0]) + self.shift < 0:
                return None
            groups = (str(int(groups[0]) + self.shift), *groups[1:])
        counterpart = self.counterpart_transform
        return (self.canonical.format(*groups), self.transform,
                counterpart.format(*groups) if counterpart else None)


@dataclass(frozen=True)
class NameTable:
    """The names one engine records, as canonical names."""

    name: str
    rules: tuple[Rule, ...]
    #: model classes (transformers) or GGUF architectures whose dumps this table is for
    architectures: tuple[str, ...] = ()

    def lookup_rule(self, recorded: str) -> Hit | None:
        """(canonical, transform, counterpart transform) of the first rule that knows the
        name, or None."""
        for rule in self.rules:
            hit = rule.match(recorded)
            if hit is not None:
                return hit
        return None

    def lookup(self, recorded: str) -> tuple[str, str | None] | None:
        """(canonical name, transform) for a recorded name, or None if no rule knows it."""
        hit = self.lookup_rule(recorded)
        return None if hit is None else (hit[0], hit[1])

    def lookup_all(self, recorded: str) -> list[Hit]:
        """Every rule's hit, in rule order: a fused record split by several rules."""
        return [hit for hit in (rule.match(recorded) for rule in self.rules) if hit is not None]

    def is_alias(self, recorded: str) -> bool:
        """Whether the first rule that knows the name is an alias (see the module doc)."""
        for rule in self.rules:
            if rule.pattern.fullmatch(recorded):
                return rule.alias
        return False

    def coverage(self, names: Iterable[str]) -> int:
        return sum(1 for n in names if self.lookup_rule(n) is not None)


class _Op(NamedTuple):
    """A per-layer op: the name after the layer's prefix and the canonical op after
    ``layers.N.``. ``{E}`` in ``suffix`` is an expert index, ``{1}`` in ``op`` its value."""

    suffix: str
    op: str
    transform: str | None = None
    alias: bool = False
    counterpart: str | None = None
    shift: int = 0


def _pattern(text: str) -> str:
    return re.escape(text).replace(r"\{E\}", r"(\d+)")


def _layer(prefix: str, ops: Iterable[_Op]) -> tuple[Rule, ...]:
    """Rules for the ops of layer ``(\\d+)`` under ``prefix`` (a plain dotted name)."""
    head = _pattern(prefix) + r"\.(\d+)"
    return tuple(Rule(re.compile(head + (r"\." + _pattern(o.suffix) if o.suffix else "")),
                      "layers.{0}." + o.op, o.transform, o.counterpart, o.alias, o.shift)
                 for o in ops)


def _top(*items: tuple[str, str] | tuple[str, str, bool]) -> tuple[Rule, ...]:
    """Rules for whole names (no layer): (name, canonical[, alias])."""
    return tuple(Rule(re.compile(re.escape(item[0])), item[1],
                      alias=bool(item[2]) if len(item) > 2 else False) for item in items)


def _under(prefix: str, canonical: str, ops: Iterable[_Op]) -> tuple[_Op, ...]:
    """``ops`` of a submodule: suffixes under ``prefix``, canonical ops under ``canonical``."""
    return tuple(o._replace(suffix=f"{prefix}.{o.suffix}" if o.suffix else prefix,
                            op=f"{canonical}.{o.op}" if canonical else o.op) for o in ops)


_TOKENS_FIRST = "transpose(-3, -2)"  # (batch, heads, tokens, head_dim): tokens before heads

#: a SwiGLU MLP as transformers names it; as Meta's reference code names it
_SWIGLU = (_Op("gate_proj", "gate"), _Op("act_fn", "gate_act"), _Op("up_proj", "up"),
           _Op("down_proj:input.0", "act"), _Op("down_proj", "down"))
_META_FFN = (_Op("w1", "gate"), _Op("w3", "up"), _Op("w2:input.0", "act"), _Op("w2", "down"))

# -- transformers (forward hooks, named as named_modules() names them) --------------------
_HF_TOP = _top(("input_ids", "input_ids"), ("model.embed_tokens", "embed"),
               ("model.rotary_emb:0", "rope_cos"), ("model.rotary_emb:1", "rope_sin"),
               ("model.norm", "final_norm"), ("model:last_hidden_state", "final_norm", True),
               ("lm_head", "logits"), (":logits", "logits", True))
_HF_QKV = (_Op("self_attn.q_proj", "q"), _Op("self_attn.k_proj", "k"),
           _Op("self_attn.v_proj", "v"))
_HF_ATTENTION = (
    _Op("input_layernorm", "attn_norm"),
    # q/k after RoPE, recorded by the transformers engine around apply_rotary_pos_emb
    _Op("self_attn.rope:0", "q_rope", _TOKENS_FIRST),
    _Op("self_attn.rope:1", "k_rope", _TOKENS_FIRST),
    _Op("self_attn:1", "attn_probs"),  # eager attention only; None (unrecorded) with sdpa
    _Op("self_attn.o_proj:input.0", "attn_heads"), _Op("self_attn.o_proj", "attn_out"),
    _Op("self_attn:0", "attn_out", alias=True),
)
_HF_QK_NORM = (_Op("self_attn.q_norm", "q_norm"), _Op("self_attn.k_norm", "k_norm"))
_HF_PRE_MLP_NORM = (_Op("post_attention_layernorm:input.0", "attn_residual"),
                    _Op("post_attention_layernorm", "mlp_norm"))
_HF_MLP = _under("mlp", "", _SWIGLU) + (_Op("mlp", "mlp_out"),)
_HF_MOE = (
    # transformers 5: a router module returning (logits, weights, ids), fused experts
    _Op("mlp.gate:0", "router"), _Op("mlp.gate:1", "expert_weights"),
    _Op("mlp.gate:2", "expert_ids"), _Op("mlp.experts.act_fn", "experts.gate_act"),
    _Op("mlp.experts", "experts_out"),
    *_under("mlp.shared_expert", "shared_expert", _SWIGLU),
    _Op("mlp.shared_expert", "shared_expert.out"),
    _Op("mlp.shared_expert_gate", "shared_expert_gate"),
    # transformers 4: the router is a Linear, one module per expert, (hidden, logits) out
    _Op("mlp.gate", "router"), *_under("mlp.experts.{E}", "experts.{1}", _SWIGLU),
    _Op("mlp:0", "mlp_out"), _Op("mlp:1", "router", alias=True),
    _Op("block_sparse_moe.gate", "router"),
    *_under("block_sparse_moe.experts.{E}", "experts.{1}", _META_FFN),
    _Op("block_sparse_moe:0", "mlp_out"), _Op("block_sparse_moe:1", "router", alias=True),
)
_HF_LAYER_OUT = (_Op("", "out"),)

TRANSFORMERS_LLAMA = NameTable("transformers-llama", _HF_TOP + _layer("model.layers", (
    *_HF_QKV, *_HF_QK_NORM, *_HF_ATTENTION, *_HF_PRE_MLP_NORM, *_HF_MLP, *_HF_MOE,
    *_HF_LAYER_OUT)), architectures=(
    "LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM",
    "Qwen2MoeForCausalLM", "Qwen3MoeForCausalLM", "MixtralForCausalLM"))

# Phi-3: fused QKV and gate-up projections (split rules need size arithmetic the transform
# language does not have yet), identity dropouts after attention and after the MLP
TRANSFORMERS_PHI3 = NameTable("transformers-phi3", _HF_TOP + _layer("model.layers", (
    _Op("self_attn.qkv_proj", "qkv"), *_HF_ATTENTION,
    _Op("resid_attn_dropout", "attn_out", alias=True), *_HF_PRE_MLP_NORM,
    _Op("mlp.gate_up_proj", "gate_up"), _Op("mlp.activation_fn", "gate_act"),
    *_HF_MLP[3:], _Op("resid_mlp_dropout", "mlp_out", alias=True), *_HF_LAYER_OUT)),
    architectures=("Phi3ForCausalLM",))

# Gemma 2 and 3: norms after attention and after the MLP too, scaled embeddings (in
# transformers 5 the embedding module scales), Gemma 3's q/k norms on (batch, heads, ...)
TRANSFORMERS_GEMMA = NameTable("transformers-gemma", _HF_TOP + _layer("model.layers", (
    *_HF_QKV, *(o._replace(transform=_TOKENS_FIRST) for o in _HF_QK_NORM), *_HF_ATTENTION,
    _Op("post_attention_layernorm:input.0", "attn_out", alias=True),
    _Op("post_attention_layernorm", "attn_post_norm"),
    _Op("pre_feedforward_layernorm:input.0", "attn_residual"),
    _Op("pre_feedforward_layernorm", "mlp_norm"), *_HF_MLP,
    _Op("post_feedforward_layernorm", "mlp_post_norm"), *_HF_LAYER_OUT)),
    architectures=("Gemma2ForCausalLM", "Gemma3ForCausalLM"))

# GPT-2: Conv1D projections, a fused QKV (c_attn), a plain GELU MLP (c_fc is "up"),
# learned position embeddings, identity dropouts
TRANSFORMERS_GPT2 = NameTable("transformers-gpt2", _top(
    ("input_ids", "input_ids"), ("transformer.wte", "tok_embed"),
    ("transformer.wpe", "pos_embed"), ("transformer.drop", "embed"),
    ("transformer.ln_f", "final_norm"), ("transformer:last_hidden_state", "final_norm", True),
    ("lm_head", "logits"), (":logits", "logits", True),
) + _layer("transformer.h", (
    _Op("ln_1", "attn_norm"), _Op("attn.c_attn", "qkv"), _Op("attn:1", "attn_probs"),
    _Op("attn.c_proj:input.0", "attn_heads"), _Op("attn.c_proj", "attn_out"),
    _Op("attn.resid_dropout", "attn_out", alias=True), _Op("attn:0", "attn_out", alias=True),
    _Op("ln_2:input.0", "attn_residual"), _Op("ln_2", "mlp_norm"), _Op("mlp.c_fc", "up"),
    _Op("mlp.act", "act"), _Op("mlp.c_proj:input.0", "act", alias=True),
    _Op("mlp.c_proj", "down"), _Op("mlp.dropout", "mlp_out"),
    _Op("mlp", "mlp_out", alias=True), *_HF_LAYER_OUT)),
    architectures=("GPT2LMHeadModel",))

# llama.cpp's graph (llm_build_llama): a name repeated by later ops is recorded as "name:op".
# Its Q and K weights were permuted by the GGUF conversion so that llama.cpp's interleaved
# RoPE works; "rope_interleaved" undoes that permutation within each head, before and after
# RoPE. (kq_soft_max-N is left out: its key dim is padded to the context size.)
_GG = r"-(\d+)"
_LLAMA_CPP_TOP = _top(
    ("input_ids", "input_ids"), ("embd", "embed"), ("inp_embd", "embed"),
    ("result_norm", "final_norm"), ("result_output", "logits"))
#: (name, suffix, canonical op, transform) of llama.cpp's per-layer records
_LLAMA_CPP_LAYER = (
    ("attn_norm", "", "attn_norm", None),
    ("Qcur", "", "q", "rope_interleaved"), ("Kcur", "", "k", "rope_interleaved"),
    ("Vcur", "", "v", None),
    ("Qcur", ":rope", "q_rope", "rope_interleaved"),
    ("Kcur", ":rope", "k_rope", "rope_interleaved"),
    ("kqv_out", "", "attn_heads", None), ("attn_out", "", "attn_out", None),
    ("ffn_inp", "", "attn_residual", None), ("ffn_norm", "", "mlp_norm", None),
    ("ffn_gate", "", "gate", None), ("ffn_up", "", "up", None),
    ("ffn_swiglu", "", "act", None), ("ffn_out", "", "down", None),
    ("l_out", "", "out", None),
    # MoE (llm_graph_context::build_moe_ffn): ffn_moe_* activations (ffn_moe_topk is a view
    # of ffn_moe_argsort, recorded with the engine option views=true), ffn_moe_weights_norm
    # when the top-k weights are renormalized (then ffn_moe_weights is before, an alias)
    ("ffn_moe_logits", "", "router", None), ("ffn_moe_topk", "", "expert_ids", None),
    ("ffn_moe_weights_norm", "", "expert_weights", None),
    ("ffn_moe_out", "", "experts_out", None))
_LLAMA_CPP_ALIASES = (("ffn_moe_weights", "expert_weights"),)


def _llama_cpp(name: str, layer: Iterable[tuple[str, str, str, str | None]],
               architectures: tuple[str, ...]) -> NameTable:
    return NameTable(name, _LLAMA_CPP_TOP + tuple(
        Rule(re.compile(re.escape(own) + _GG + suffix), f"layers.{{0}}.{op}", transform)
        for own, suffix, op, transform in layer) + tuple(
        Rule(re.compile(re.escape(own) + _GG), f"layers.{{0}}.{op}", alias=True)
        for own, op in _LLAMA_CPP_ALIASES), architectures=architectures)


LLAMA_CPP = _llama_cpp("llama.cpp", _LLAMA_CPP_LAYER, ("llama",))

# llama.cpp's Qwen2-MoE and Qwen3-MoE graphs (llm_build_qwen2moe, llm_build_qwen3moe): NEOX
# RoPE on Q/K weights the conversion left as they are (no rope_interleaved), every layer
# sparse, so ffn_gate/ffn_up/ffn_swiglu are the shared expert's, ffn_shexp its (ungated)
# output, ffn_shexp_gate_inp its gate logit, ffn_shexp_gate the logit's sigmoid, and ffn_out
# the whole MLP's output
_SHARED = {"ffn_gate": "shared_expert.gate", "ffn_up": "shared_expert.up",
           "ffn_swiglu": "shared_expert.act", "ffn_out": "mlp_out"}
LLAMA_CPP_QWEN_MOE = _llama_cpp("llama.cpp-qwen-moe", tuple(
    (own, suffix, _SHARED.get(own, op), None if own in ("Qcur", "Kcur") else transform)
    for own, suffix, op, transform in _LLAMA_CPP_LAYER) + (
    ("ffn_shexp", "", "shared_expert.out", None),
    ("ffn_shexp_gate_inp", "", "shared_expert_gate", None),
    ("ffn_shexp_gate", "", "shared_expert_gate_prob", None)), ("qwen2moe", "qwen3moe"))


# the zoo's MoE block (zoo/moe.py): transformers' router and grouped experts, Meta's names
# inside each expert
_ZOO_MOE = (
    _Op("gate:0", "router"), _Op("gate:1", "expert_weights"), _Op("gate:2", "expert_ids"),
    _Op("experts.act_fn", "experts.gate_act"), _Op("experts", "experts_out"),
    *_under("experts.{E}", "experts.{1}", _META_FFN),
    *_under("shared_expert", "shared_expert", _META_FFN),
    _Op("shared_expert", "shared_expert.out"), _Op("shared_expert_gate", "shared_expert_gate"),
    _Op("", "mlp_out"),
)

# Meta's Llama reference code (model.py), which lockstep's zoo engine follows name for name;
# the zoo also records q/k norms in 16-element blocks, each paired with a block of the other
# side's whole norm output
LLAMA_REFERENCE = NameTable("llama-reference", _top(
    ("input_ids", "input_ids"), ("tok_embeddings", "embed"), ("norm", "final_norm"),
    ("output", "logits"),
) + _layer("layers", (
    _Op("attention_norm", "attn_norm"), _Op("attention.wq", "q"), _Op("attention.wk", "k"),
    _Op("attention.wv", "v"), _Op("attention.q_norm", "q_norm"),
    _Op("attention.k_norm", "k_norm"),
    _Op("attention.q_norm.block{E}", "q_norm", counterpart="block(16, {1})"),
    _Op("attention.k_norm.block{E}", "k_norm", counterpart="block(16, {1})"),
    _Op("attention.rope:0", "q_rope"), _Op("attention.rope:1", "k_rope"),
    _Op("attention.wo:input.0", "attn_heads"), _Op("attention.wo", "attn_out"),
    _Op("ffn_norm:input.0", "attn_residual"), _Op("ffn_norm", "mlp_norm"),
    *_under("feed_forward", "", _META_FFN), *_under("feed_forward", "", _ZOO_MOE),
    *_HF_LAYER_OUT,
    # the zoo's other families: Gemma 2's norms after attention and the MLP, Phi-3's fused
    # projections
    _Op("post_attention_norm", "attn_post_norm"), _Op("post_ffn_norm", "mlp_post_norm"),
    _Op("attention.qkv", "qkv"), _Op("feed_forward.w13", "gate_up"))))

# vLLM and SGLang (vllm/model_executor/models/llama.py, qwen3.py; sglang/srt/models/qwen3.py)
# and engines written after them (nano-vLLM): the same module names as transformers, but
# fused qkv_proj (q, k, v rows stacked) and gate_up_proj (gate, then up), act_fn is
# SiluAndMul (the down projection's input), norms add the residual and return
# (normed, residual sum), layers return (mlp output, residual), linear layers return
# (output, bias) in vLLM and SGLang, the rotary module returns (q, k), attention is a module
# of its own, and the logits come from logits_processor (or an lm_head call) outside forward
_QKV_SPLIT = (("q", "0", "n_heads*head_dim"),
              ("k", "n_heads*head_dim", "(n_heads+n_kv_heads)*head_dim"),
              ("v", "(n_heads+n_kv_heads)*head_dim", "(n_heads+2*n_kv_heads)*head_dim"))
_GATE_UP_SPLIT = (("gate", "0", "n_ff"), ("up", "n_ff", "2*n_ff"))


def _linear(suffix: str, op: str, transform: str | None = None) -> tuple[_Op, ...]:
    """A linear layer's output, plain or as the first of vLLM's (output, bias)."""
    return (_Op(suffix, op, transform), _Op(suffix + ":0", op, transform))


def _split(suffix: str, parts: tuple[tuple[str, str, str], ...]) -> tuple[_Op, ...]:
    return tuple(op for name, start, stop in parts
                 for op in _linear(suffix, name, f"squeeze|slice(-1, {start}, {stop})"))


def _fused_norm(suffix: str, op: str) -> tuple[_Op, ...]:
    """A norm that adds the residual first: plain (no residual yet), or (normed, sum)."""
    return (_Op(suffix, op), _Op(suffix + ":0", op))


_ENGINE_LAYER = (
    *_fused_norm("input_layernorm", "attn_norm"),
    _Op("input_layernorm:1", "out", shift=-1),  # the residual sum: the previous layer's out
    *_split("self_attn.qkv_proj", _QKV_SPLIT), *_HF_QK_NORM,
    _Op("self_attn.rotary_emb:0", "q_rope"), _Op("self_attn.rotary_emb:1", "k_rope"),
    _Op("self_attn.attn", "attn_heads"), *_linear("self_attn.o_proj", "attn_out"),
    _Op("self_attn", "attn_out", alias=True),
    *_fused_norm("post_attention_layernorm", "mlp_norm"),
    _Op("post_attention_layernorm:1", "attn_residual"),
    *_split("mlp.gate_up_proj", _GATE_UP_SPLIT), _Op("mlp.act_fn", "act"),
    *_linear("mlp.down_proj", "down"), _Op("mlp", "mlp_out", alias=True),
    _Op(":0", "mlp_out", alias=True), _Op(":1", "attn_residual", alias=True),
)
VLLM = NameTable("vllm-sglang", _top(
    ("input_ids", "input_ids"), ("model.embed_tokens", "embed"), ("model.norm", "final_norm"),
    ("model.norm:0", "final_norm"), ("logits_processor", "logits"), ("lm_head", "logits"),
) + _layer("model.layers", _ENGINE_LAYER))

#: in order of preference when two tables know as many of a dump's names
TABLES: tuple[NameTable, ...] = (TRANSFORMERS_LLAMA, TRANSFORMERS_PHI3, TRANSFORMERS_GEMMA,
                                 TRANSFORMERS_GPT2, LLAMA_CPP, LLAMA_CPP_QWEN_MOE,
                                 LLAMA_REFERENCE, VLLM)


def detect_table(names: Iterable[str], meta: Mapping[str, Any] | None = None) -> NameTable | None:
    """The table for a dump: the one made for the run metadata's ``architecture`` if it knows
    a quarter of the names, else the one that knows most of them (at least a quarter; the
    first in ``TABLES`` on a tie), or None."""
    names = list(set(names))
    covered = {t.name: t.coverage(names) for t in TABLES}
    architecture = (meta or {}).get("architecture")
    fitting = [t for t in TABLES if covered[t.name] and covered[t.name] * 4 >= len(names)]
    for table in fitting:
        if architecture and architecture in table.architectures:
            return table
    return max(fitting, key=lambda t: covered[t.name], default=None)
