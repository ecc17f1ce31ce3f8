"""Name tables: each engine's recorded names listed against the tensor kind (align.kinds) each
stands for, as one canonical name per transformer op.

Canonical names (``layers.N.<op>`` for per-layer ops) are what two engines' records are paired
by when their own names differ. A rule can also name a layout transform (align/transforms.py)
that brings its engine's tensor into the canonical layout: the layout transformers uses for
that op, except that per-head tensors are (batch, tokens, heads, head_dim), the order of the
Q/K/V projections' features (transformers' RoPE outputs and Gemma 3's q/k norms are
(batch, heads, tokens, head_dim) and carry a transform). Size-1 dims never matter.

The canonical names and what each holds are listed in align/kinds.py; every rule's canonical
name is checked against ``Kind`` when the rule is made, so a misspelt op fails at import.

Some records repeat a tensor another record of the same dump already holds (an identity
dropout, a wrapper module's output); their rule is an *alias*: the same canonical name,
paired only when the first record is missing.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, Iterable, Mapping, NamedTuple

from .kinds import Kind, check_template

__all__ = ["Rule", "NameTable", "TABLES", "detect_table", "table_canonical",
           "TRANSFORMERS_LLAMA", "TRANSFORMERS_PHI3", "TRANSFORMERS_GEMMA", "TRANSFORMERS_GPT2",
           "LLAMA_CPP", "LLAMA_CPP_QWEN_MOE", "LLAMA_REFERENCE", "VLLM", "VLLM_GEMMA"]

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

    def __post_init__(self) -> None:
        check_template(self.canonical)  # a template naming no Kind fails here, at import

    @property
    def kind(self) -> Kind:
        """The tensor kind the rule's names stand for."""
        return check_template(self.canonical).kind

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
    #: the record that holds the last layer's output where no record of that layer does
    #: (vLLM's and SGLang's layers return (hidden, residual); the final norm adds them first)
    last_out: str | None = None

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

    @property
    def kinds(self) -> frozenset[Kind]:
        """The tensor kinds the table names."""
        return frozenset(rule.kind for rule in self.rules)


class _Op(NamedTuple):
    """A per-layer op: the name after the layer's prefix and the kind it holds, in ``scope``
    (align.kinds). ``{E}`` in ``suffix`` is an expert index, ``{1}`` in ``scope`` its value."""

    suffix: str
    kind: Kind
    transform: str | None = None
    alias: bool = False
    counterpart: str | None = None
    shift: int = 0
    scope: str = ""

    @property
    def op(self) -> str:
        """The canonical name after ``layers.N.``."""
        return f"{self.scope}.{self.kind.value}" if self.scope else self.kind.value


def _pattern(text: str) -> str:
    return re.escape(text).replace(r"\{E\}", r"(\d+)")


def _layer(prefix: str, ops: Iterable[_Op]) -> tuple[Rule, ...]:
    """Rules for the ops of layer ``(\\d+)`` under ``prefix`` (a plain dotted name)."""
    head = _pattern(prefix) + r"\.(\d+)"
    return tuple(Rule(re.compile(head + (r"\." + _pattern(o.suffix) if o.suffix else "")),
                      "layers.{0}." + o.op, o.transform, o.counterpart, o.alias, o.shift)
                 for o in ops)


def _top(*items: tuple[str, Kind] | tuple[str, Kind, bool]) -> tuple[Rule, ...]:
    """Rules for whole names (no layer): (name, kind[, alias])."""
    return tuple(Rule(re.compile(re.escape(item[0])), item[1].value,
                      alias=bool(item[2]) if len(item) > 2 else False) for item in items)


def _under(prefix: str, scope: str, ops: Iterable[_Op]) -> tuple[_Op, ...]:
    """``ops`` of a submodule: suffixes under ``prefix``, kinds in ``scope`` (align.kinds)."""
    return tuple(o._replace(suffix=f"{prefix}.{o.suffix}" if o.suffix else prefix,
                            scope=".".join(filter(None, (scope, o.scope)))) for o in ops)


K = Kind  # short, for the tables below
_TOKENS_FIRST = "transpose(-3, -2)"  # (batch, heads, tokens, head_dim): tokens before heads

#: a SwiGLU MLP as transformers names it; as Meta's reference code names it
_SWIGLU = (_Op("gate_proj", K.GATE), _Op("act_fn", K.GATE_ACT), _Op("up_proj", K.UP),
           _Op("down_proj:input.0", K.ACT), _Op("down_proj", K.DOWN))
_META_FFN = (_Op("w1", K.GATE), _Op("w3", K.UP), _Op("w2:input.0", K.ACT), _Op("w2", K.DOWN))

# -- transformers (forward hooks, named as named_modules() names them) --------------------
_HF_TOP = _top(("input_ids", K.INPUT_IDS), ("model.embed_tokens", K.EMBED),
               ("model.rotary_emb:0", K.ROPE_COS), ("model.rotary_emb:1", K.ROPE_SIN),
               ("model.norm", K.FINAL_NORM), ("model:last_hidden_state", K.FINAL_NORM, True),
               ("lm_head", K.LOGITS), (":logits", K.LOGITS, True))
_HF_QKV = (_Op("self_attn.q_proj", K.Q), _Op("self_attn.k_proj", K.K),
           _Op("self_attn.v_proj", K.V))
_HF_ATTENTION = (
    _Op("input_layernorm", K.ATTN_NORM),
    # q/k after RoPE, recorded by the transformers engine around apply_rotary_pos_emb
    _Op("self_attn.rope:0", K.Q_ROPE, _TOKENS_FIRST),
    _Op("self_attn.rope:1", K.K_ROPE, _TOKENS_FIRST),
    _Op("self_attn:1", K.ATTN_PROBS),  # eager attention only; None (unrecorded) with sdpa
    _Op("self_attn.o_proj:input.0", K.ATTN_HEADS), _Op("self_attn.o_proj", K.ATTN_OUT),
    _Op("self_attn:0", K.ATTN_OUT, alias=True),
)
_HF_QK_NORM = (_Op("self_attn.q_norm", K.Q_NORM), _Op("self_attn.k_norm", K.K_NORM))
_HF_PRE_MLP_NORM = (_Op("post_attention_layernorm:input.0", K.ATTN_RESIDUAL),
                    _Op("post_attention_layernorm", K.MLP_NORM))
_HF_MLP = _under("mlp", "", _SWIGLU) + (_Op("mlp", K.MLP_OUT),)
_HF_MOE = (
    # transformers 5: a router module returning (logits, weights, ids), fused experts
    _Op("mlp.gate:0", K.ROUTER), _Op("mlp.gate:1", K.EXPERT_WEIGHTS),
    _Op("mlp.gate:2", K.EXPERT_IDS), _Op("mlp.experts.act_fn", K.GATE_ACT, scope="experts"),
    _Op("mlp.experts", K.EXPERTS_OUT),
    *_under("mlp.shared_expert", "shared_expert", _SWIGLU),
    _Op("mlp.shared_expert", K.OUT, scope="shared_expert"),
    _Op("mlp.shared_expert_gate", K.SHARED_EXPERT_GATE),
    # transformers 4: the router is a Linear, one module per expert, (hidden, logits) out
    _Op("mlp.gate", K.ROUTER), *_under("mlp.experts.{E}", "experts.{1}", _SWIGLU),
    _Op("mlp:0", K.MLP_OUT), _Op("mlp:1", K.ROUTER, alias=True),
    _Op("block_sparse_moe.gate", K.ROUTER),
    *_under("block_sparse_moe.experts.{E}", "experts.{1}", _META_FFN),
    _Op("block_sparse_moe:0", K.MLP_OUT), _Op("block_sparse_moe:1", K.ROUTER, alias=True),
)
_HF_LAYER_OUT = (_Op("", K.OUT),)

TRANSFORMERS_LLAMA = NameTable("transformers-llama", _HF_TOP + _layer("model.layers", (
    *_HF_QKV, *_HF_QK_NORM, *_HF_ATTENTION, *_HF_PRE_MLP_NORM, *_HF_MLP, *_HF_MOE,
    *_HF_LAYER_OUT)), architectures=(
    "LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM",
    "Qwen2MoeForCausalLM", "Qwen3MoeForCausalLM", "MixtralForCausalLM"))

# Phi-3: fused QKV and gate-up projections (split rules need size arithmetic the transform
# language does not have yet), identity dropouts after attention and after the MLP
TRANSFORMERS_PHI3 = NameTable("transformers-phi3", _HF_TOP + _layer("model.layers", (
    _Op("self_attn.qkv_proj", K.QKV), *_HF_ATTENTION,
    _Op("resid_attn_dropout", K.ATTN_OUT, alias=True), *_HF_PRE_MLP_NORM,
    _Op("mlp.gate_up_proj", K.GATE_UP), _Op("mlp.activation_fn", K.GATE_ACT),
    *_HF_MLP[3:], _Op("resid_mlp_dropout", K.MLP_OUT, alias=True), *_HF_LAYER_OUT)),
    architectures=("Phi3ForCausalLM",))

# Gemma 2 and 3: norms after attention and after the MLP too, scaled embeddings (in
# transformers 5 the embedding module scales), Gemma 3's q/k norms on (batch, heads, ...)
TRANSFORMERS_GEMMA = NameTable("transformers-gemma", _HF_TOP + _layer("model.layers", (
    *_HF_QKV, *(o._replace(transform=_TOKENS_FIRST) for o in _HF_QK_NORM), *_HF_ATTENTION,
    _Op("post_attention_layernorm:input.0", K.ATTN_OUT, alias=True),
    _Op("post_attention_layernorm", K.ATTN_POST_NORM),
    _Op("pre_feedforward_layernorm:input.0", K.ATTN_RESIDUAL),
    _Op("pre_feedforward_layernorm", K.MLP_NORM), *_HF_MLP,
    _Op("post_feedforward_layernorm", K.MLP_POST_NORM), *_HF_LAYER_OUT)),
    architectures=("Gemma2ForCausalLM", "Gemma3ForCausalLM"))

# GPT-2: Conv1D projections, a fused QKV (c_attn), a plain GELU MLP (c_fc is "up"),
# learned position embeddings, identity dropouts
TRANSFORMERS_GPT2 = NameTable("transformers-gpt2", _top(
    ("input_ids", K.INPUT_IDS), ("transformer.wte", K.TOK_EMBED),
    ("transformer.wpe", K.POS_EMBED), ("transformer.drop", K.EMBED),
    ("transformer.ln_f", K.FINAL_NORM), ("transformer:last_hidden_state", K.FINAL_NORM, True),
    ("lm_head", K.LOGITS), (":logits", K.LOGITS, True),
) + _layer("transformer.h", (
    _Op("ln_1", K.ATTN_NORM), _Op("attn.c_attn", K.QKV), _Op("attn:1", K.ATTN_PROBS),
    _Op("attn.c_proj:input.0", K.ATTN_HEADS), _Op("attn.c_proj", K.ATTN_OUT),
    _Op("attn.resid_dropout", K.ATTN_OUT, alias=True), _Op("attn:0", K.ATTN_OUT, alias=True),
    _Op("ln_2:input.0", K.ATTN_RESIDUAL), _Op("ln_2", K.MLP_NORM), _Op("mlp.c_fc", K.UP),
    _Op("mlp.act", K.ACT), _Op("mlp.c_proj:input.0", K.ACT, alias=True),
    _Op("mlp.c_proj", K.DOWN), _Op("mlp.dropout", K.MLP_OUT),
    _Op("mlp", K.MLP_OUT, alias=True), *_HF_LAYER_OUT)),
    architectures=("GPT2LMHeadModel",))

# llama.cpp's graph (llm_build_llama): a name repeated by later ops is recorded as "name:op".
# Its Q and K weights were permuted by the GGUF conversion so that llama.cpp's interleaved
# RoPE works; "rope_interleaved" undoes that permutation within each head, before and after
# RoPE. (kq_soft_max-N is left out: its key dim is padded to the context size.)
_LLAMA_CPP_TOP = _top(
    ("input_ids", K.INPUT_IDS), ("embd", K.EMBED), ("inp_embd", K.EMBED),
    ("result_norm", K.FINAL_NORM), ("result_output", K.LOGITS))
#: llama.cpp's per-layer records: "Qcur:rope" is "Qcur-N:rope" in layer N
_ROPE_INTERLEAVED = "rope_interleaved"
_LLAMA_CPP_LAYER = (
    _Op("attn_norm", K.ATTN_NORM),
    _Op("Qcur", K.Q, _ROPE_INTERLEAVED), _Op("Kcur", K.K, _ROPE_INTERLEAVED), _Op("Vcur", K.V),
    _Op("Qcur:rope", K.Q_ROPE, _ROPE_INTERLEAVED), _Op("Kcur:rope", K.K_ROPE, _ROPE_INTERLEAVED),
    _Op("kqv_out", K.ATTN_HEADS), _Op("attn_out", K.ATTN_OUT),
    _Op("ffn_inp", K.ATTN_RESIDUAL), _Op("ffn_norm", K.MLP_NORM),
    _Op("ffn_gate", K.GATE), _Op("ffn_up", K.UP), _Op("ffn_swiglu", K.ACT),
    _Op("ffn_out", K.DOWN), _Op("l_out", K.OUT),
    # MoE (llm_graph_context::build_moe_ffn): ffn_moe_* activations (ffn_moe_topk is a view
    # of ffn_moe_argsort, recorded with the engine option views=true), ffn_moe_weights_norm
    # when the top-k weights are renormalized (then ffn_moe_weights is before, an alias)
    _Op("ffn_moe_logits", K.ROUTER), _Op("ffn_moe_topk", K.EXPERT_IDS),
    _Op("ffn_moe_weights_norm", K.EXPERT_WEIGHTS), _Op("ffn_moe_out", K.EXPERTS_OUT))
_LLAMA_CPP_ALIASES = (_Op("ffn_moe_weights", K.EXPERT_WEIGHTS, alias=True),)


def _llama_cpp(name: str, layer: Iterable[_Op], architectures: tuple[str, ...]) -> NameTable:
    def rule(o: _Op) -> Rule:
        own, colon, after = o.suffix.partition(":")
        return Rule(re.compile(re.escape(own) + r"-(\d+)" + re.escape(colon + after)),
                    "layers.{0}." + o.op, o.transform, alias=o.alias)

    return NameTable(name, _LLAMA_CPP_TOP + tuple(map(rule, (*layer, *_LLAMA_CPP_ALIASES))),
                     architectures=architectures)


LLAMA_CPP = _llama_cpp("llama.cpp", _LLAMA_CPP_LAYER, ("llama",))

# llama.cpp's Qwen2-MoE and Qwen3-MoE graphs (llm_build_qwen2moe, llm_build_qwen3moe): NEOX
# RoPE on Q/K weights the conversion left as they are (no rope_interleaved), every layer
# sparse, so ffn_gate/ffn_up/ffn_swiglu are the shared expert's, ffn_shexp its (ungated)
# output, ffn_shexp_gate_inp its gate logit, ffn_shexp_gate the logit's sigmoid, and ffn_out
# the whole MLP's output
_SHARED = {"ffn_gate": _Op("", K.GATE, scope="shared_expert"),
           "ffn_up": _Op("", K.UP, scope="shared_expert"),
           "ffn_swiglu": _Op("", K.ACT, scope="shared_expert"), "ffn_out": _Op("", K.MLP_OUT)}
LLAMA_CPP_QWEN_MOE = _llama_cpp("llama.cpp-qwen-moe", tuple(
    o._replace(transform=None) if o.transform == _ROPE_INTERLEAVED else
    o._replace(kind=_SHARED[o.suffix].kind, scope=_SHARED[o.suffix].scope)
    if o.suffix in _SHARED else o for o in _LLAMA_CPP_LAYER) + (
    _Op("ffn_shexp", K.OUT, scope="shared_expert"),
    _Op("ffn_shexp_gate_inp", K.SHARED_EXPERT_GATE),
    _Op("ffn_shexp_gate", K.SHARED_EXPERT_GATE_PROB)), ("qwen2moe", "qwen3moe"))


# the zoo's MoE block (zoo/moe.py): transformers' router and grouped experts, Meta's names
# inside each expert
_ZOO_MOE = (
    _Op("gate:0", K.ROUTER), _Op("gate:1", K.EXPERT_WEIGHTS), _Op("gate:2", K.EXPERT_IDS),
    _Op("experts.act_fn", K.GATE_ACT, scope="experts"), _Op("experts", K.EXPERTS_OUT),
    *_under("experts.{E}", "experts.{1}", _META_FFN),
    *_under("shared_expert", "shared_expert", _META_FFN),
    _Op("shared_expert", K.OUT, scope="shared_expert"),
    _Op("shared_expert_gate", K.SHARED_EXPERT_GATE),
    _Op("", K.MLP_OUT),
)

# Meta's Llama reference code (model.py), which lockstep's zoo engine follows name for name;
# the zoo also records q/k norms in 16-element blocks, each paired with a block of the other
# side's whole norm output
LLAMA_REFERENCE = NameTable("llama-reference", _top(
    ("input_ids", K.INPUT_IDS), ("tok_embeddings", K.EMBED), ("norm", K.FINAL_NORM),
    ("output", K.LOGITS),
) + _layer("layers", (
    _Op("attention_norm", K.ATTN_NORM), _Op("attention.wq", K.Q), _Op("attention.wk", K.K),
    _Op("attention.wv", K.V), _Op("attention.q_norm", K.Q_NORM),
    _Op("attention.k_norm", K.K_NORM),
    _Op("attention.q_norm.block{E}", K.Q_NORM, counterpart="block(16, {1})"),
    _Op("attention.k_norm.block{E}", K.K_NORM, counterpart="block(16, {1})"),
    _Op("attention.rope:0", K.Q_ROPE), _Op("attention.rope:1", K.K_ROPE),
    _Op("attention.wo:input.0", K.ATTN_HEADS), _Op("attention.wo", K.ATTN_OUT),
    _Op("ffn_norm:input.0", K.ATTN_RESIDUAL), _Op("ffn_norm", K.MLP_NORM),
    *_under("feed_forward", "", _META_FFN), *_under("feed_forward", "", _ZOO_MOE),
    *_HF_LAYER_OUT,
    # the zoo's other families: Gemma 2's norms after attention and the MLP, Phi-3's fused
    # projections
    _Op("post_attention_norm", K.ATTN_POST_NORM), _Op("post_ffn_norm", K.MLP_POST_NORM),
    _Op("attention.qkv", K.QKV), _Op("feed_forward.w13", K.GATE_UP))))

# vLLM and SGLang (vllm/model_executor/models/llama.py, qwen3.py; sglang/srt/models/qwen3.py)
# and engines written after them (nano-vLLM): the same module names as transformers, but
# fused qkv_proj (q, k, v rows stacked) and gate_up_proj (gate, then up), act_fn is
# SiluAndMul (the down projection's input), norms add the residual and return
# (normed, residual sum), layers return (mlp output, residual), linear layers return
# (output, bias) in vLLM and SGLang, the rotary module returns (q, k), attention is a module
# of its own, and the logits come from logits_processor (or an lm_head call) outside forward
_QKV_SPLIT = ((K.Q, "0", "n_heads*head_dim"),
              (K.K, "n_heads*head_dim", "(n_heads+n_kv_heads)*head_dim"),
              (K.V, "(n_heads+n_kv_heads)*head_dim", "(n_heads+2*n_kv_heads)*head_dim"))
_GATE_UP_SPLIT = ((K.GATE, "0", "n_ff"), (K.UP, "n_ff", "2*n_ff"))


def _linear(suffix: str, kind: Kind, transform: str | None = None) -> tuple[_Op, ...]:
    """A linear layer's output, plain or as the first of vLLM's (output, bias)."""
    return (_Op(suffix, kind, transform), _Op(suffix + ":0", kind, transform))


def _split(suffix: str, parts: tuple[tuple[Kind, str, str], ...]) -> tuple[_Op, ...]:
    return tuple(op for kind, start, stop in parts
                 for op in _linear(suffix, kind, f"squeeze|slice(-1, {start}, {stop})"))


def _fused_norm(suffix: str, kind: Kind) -> tuple[_Op, ...]:
    """A norm that adds the residual first: plain (no residual yet), or (normed, sum)."""
    return (_Op(suffix, kind), _Op(suffix + ":0", kind))


_ENGINE_LAYER = (
    *_fused_norm("input_layernorm", K.ATTN_NORM),
    _Op("input_layernorm:1", K.OUT, shift=-1),  # the residual sum: the previous layer's out
    *_split("self_attn.qkv_proj", _QKV_SPLIT), *_HF_QK_NORM,
    _Op("self_attn.rotary_emb:0", K.Q_ROPE), _Op("self_attn.rotary_emb:1", K.K_ROPE),
    _Op("self_attn.attn", K.ATTN_HEADS), *_linear("self_attn.o_proj", K.ATTN_OUT),
    _Op("self_attn", K.ATTN_OUT, alias=True),
    *_fused_norm("post_attention_layernorm", K.MLP_NORM),
    _Op("post_attention_layernorm:1", K.ATTN_RESIDUAL),
    *_split("mlp.gate_up_proj", _GATE_UP_SPLIT), _Op("mlp.act_fn", K.ACT),
    *_linear("mlp.down_proj", K.DOWN), _Op("mlp", K.MLP_OUT, alias=True),
    _Op(":0", K.MLP_OUT, alias=True), _Op(":1", K.ATTN_RESIDUAL, alias=True),
)
VLLM = NameTable("vllm-sglang", _top(
    ("input_ids", K.INPUT_IDS), ("model.embed_tokens", K.EMBED), ("model.norm", K.FINAL_NORM),
    ("model.norm:0", K.FINAL_NORM), ("logits_processor", K.LOGITS), ("lm_head", K.LOGITS),
    ("logits_processor:next_token_logits", K.LOGITS),  # SGLang's LogitsProcessorOutput
) + _layer("model.layers", _ENGINE_LAYER), last_out="model.norm:1")

# vLLM's and SGLang's gemma2.py / gemma3.py: the embedding module gives the rows, scaled by
# sqrt(hidden) after it (transformers folds the scale into its module); post_attention_layernorm
# is a plain norm of the attention output and pre_feedforward_layernorm the one that adds the
# residual; the layer returns (post_feedforward_layernorm's output, residual)
_ENGINE_GEMMA_LAYER = tuple(
    op for op in _ENGINE_LAYER
    if not op.suffix.startswith("post_attention_layernorm") and op.suffix != ":0") + (
    _Op("post_attention_layernorm", K.ATTN_POST_NORM),
    *_fused_norm("pre_feedforward_layernorm", K.MLP_NORM),
    _Op("pre_feedforward_layernorm:1", K.ATTN_RESIDUAL),
    _Op("post_feedforward_layernorm", K.MLP_POST_NORM),
    _Op(":0", K.MLP_POST_NORM, alias=True),
)
VLLM_GEMMA = NameTable("vllm-sglang-gemma", _top(
    ("input_ids", K.INPUT_IDS), ("model.embed_tokens", K.TOK_EMBED), ("model.norm", K.FINAL_NORM),
    ("model.norm:0", K.FINAL_NORM), ("logits_processor", K.LOGITS), ("lm_head", K.LOGITS),
    ("logits_processor:next_token_logits", K.LOGITS),
) + _layer("model.layers", _ENGINE_GEMMA_LAYER),
    architectures=("Gemma2ForCausalLM", "Gemma3ForCausalLM"), last_out="model.norm:1")

#: in order of preference when two tables know as many of a dump's names
TABLES: tuple[NameTable, ...] = (TRANSFORMERS_LLAMA, TRANSFORMERS_PHI3, TRANSFORMERS_GEMMA,
                                 TRANSFORMERS_GPT2, LLAMA_CPP, LLAMA_CPP_QWEN_MOE,
                                 LLAMA_REFERENCE, VLLM, VLLM_GEMMA)


def detect_table(names: Iterable[str], meta: Mapping[str, Any] | None = None) -> NameTable | None:
    """The table for a dump: the one that knows most of its names (at least a quarter); among
    those that know as many, the one made for the run metadata's ``architecture``, else the
    first in ``TABLES``; or None.

    The architecture only breaks ties: it names the model, not the engine's names (an engine
    written after vLLM reports the transformers class of the model it runs)."""
    names = list(set(names))
    covered = {t.name: t.coverage(names) for t in TABLES}
    best = max(covered.values(), default=0)
    if not best or best * 4 < len(names):
        return None
    fitting = [t for t in TABLES if covered[t.name] == best]
    architecture = (meta or {}).get("architecture")
    return next((t for t in fitting if architecture and architecture in t.architectures),
                fitting[0])


@lru_cache(maxsize=8192)
def table_canonical(recorded: str) -> str | None:
    """The canonical name the first table (in ``TABLES`` order) that knows a recorded name
    gives it, or None."""
    for table in TABLES:
        hit = table.lookup_rule(recorded)
        if hit is not None:
            return hit[0]
    return None
