"""Weight-name tables: each checkpoint family's tensor names mapped to one canonical name.

Two checkpoints of the same model (a GGUF file, a transformers directory, Meta's reference
``consolidated.pth``) or a live model and its checkpoint are paired by these canonical names.

Canonical names are ``embed``, ``layers.N.<op>`` (``attn_norm``, ``q``, ``k``, ``v``, ``o``,
``q_norm``, ``k_norm``, ``mlp_norm``, ``gate``, ``up``, ``down``), ``final_norm`` and
``lm_head``, each followed by ``.weight`` or ``.bias``. For example ``layers.3.q.weight`` is
GGUF's ``blk.3.attn_q.weight``, transformers' ``model.layers.3.self_attn.q_proj.weight`` and
Meta's ``layers.3.attention.wq.weight``; Meta's ``feed_forward.w1``/``w3``/``w2`` are
``gate``/``up``/``down``, and ``output.weight`` is the lm_head in both GGUF and Meta files.
The fused ``qkv`` and ``gate_up`` (vLLM's ``qkv_proj`` and ``gate_up_proj``) pair with their
parts stacked by rows, and a MoE layer's experts held as one tensor with each expert's
tensors stacked in turn (checkpoint/fused.py; the ``MOE`` table below).

Wrapper prefixes (``base_model.model.`` from PEFT,
``module.`` from DDP, ``_orig_mod.`` from torch.compile) and PEFT's ``.base_layer`` are
ignored. A name no table knows pairs with the same name on the other side.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

__all__ = ["WeightTable", "TABLES", "WRAPPERS", "unwrap", "canonical_weight", "layer_index",
           "ROPE_ROWS", "FUSED", "EXPERT_STACKS", "role", "transformers_name"]

#: prefixes that wrappers put before the wrapped model's own names
WRAPPERS = ("base_model.model.", "module.", "_orig_mod.")

#: fused roles (vLLM, SGLang, Phi-3): the parts stacked by rows, in order (checkpoint/fused.py)
FUSED = {"qkv": ("q", "k", "v"), "gate_up": ("gate", "up")}

#: all experts' tensors stacked into one (checkpoint/fused.py): for each expert in turn, the
#: rows of its parts in order
EXPERT_STACKS = {"experts_gate_up": ("gate", "up"), "experts_gate": ("gate",),
                 "experts_up": ("up",), "experts_down": ("down",)}

#: canonical roles whose rows llama.cpp's and Meta's layouts order differently (RoPE pairs)
ROPE_ROWS = frozenset({"q", "k"})

_P = r"\.(weight|bias)"


@dataclass(frozen=True)
class WeightTable:
    """The tensor names of one checkpoint family, as canonical names."""

    name: str
    rules: tuple[tuple[re.Pattern[str], str], ...]  #: (full-match pattern, canonical template)

    @classmethod
    def build(cls, name: str, layer: str, per_layer: dict[str, str],
              globals_: dict[str, str]) -> WeightTable:
        """``layer`` is the regex of a layer's prefix with one group, the layer index."""
        rules = [(re.compile(layer + re.escape("." + own) + _P), "layers.{0}." + role + ".{1}")
                 for own, role in per_layer.items()]
        rules += [(re.compile(re.escape(own) + _P), role + ".{0}")
                  for own, role in globals_.items()]
        return cls(name, tuple(rules))

    def lookup(self, name: str) -> str | None:
        """The canonical name of an (unwrapped) tensor name, or None."""
        for pattern, template in self.rules:
            m = pattern.fullmatch(name)
            if m:
                return template.format(*m.groups())
        return None


GGUF = WeightTable.build("gguf", r"blk\.(\d+)", {
    "attn_norm": "attn_norm", "attn_q": "q", "attn_k": "k", "attn_v": "v",
    "attn_output": "o", "attn_q_norm": "q_norm", "attn_k_norm": "k_norm",
    "ffn_norm": "mlp_norm", "ffn_gate": "gate", "ffn_up": "up", "ffn_down": "down",
}, {"token_embd": "embed", "output_norm": "final_norm", "output": "lm_head"})

_TRANSFORMERS_LAYER = {
    "input_layernorm": "attn_norm", "self_attn.q_proj": "q", "self_attn.k_proj": "k",
    "self_attn.v_proj": "v", "self_attn.o_proj": "o", "self_attn.q_norm": "q_norm",
    "self_attn.k_norm": "k_norm", "post_attention_layernorm": "mlp_norm",
    "mlp.gate_proj": "gate", "mlp.up_proj": "up", "mlp.down_proj": "down",
    "self_attn.qkv_proj": "qkv", "mlp.gate_up_proj": "gate_up",
}
_TRANSFORMERS_GLOBAL = {"model.embed_tokens": "embed", "embed_tokens": "embed",
                        "model.norm": "final_norm", "lm_head": "lm_head"}
TRANSFORMERS = WeightTable.build("transformers", r"(?:model\.)?layers\.(\d+)",
                                 _TRANSFORMERS_LAYER, _TRANSFORMERS_GLOBAL)

META_LLAMA = WeightTable.build("meta-llama", r"layers\.(\d+)", {
    "attention_norm": "attn_norm", "attention.wq": "q", "attention.wk": "k",
    "attention.wv": "v", "attention.wo": "o", "ffn_norm": "mlp_norm",
    "feed_forward.w1": "gate", "feed_forward.w3": "up", "feed_forward.w2": "down",
}, {"tok_embeddings": "embed", "norm": "final_norm", "output": "lm_head"})

_MOE_BLOCK = r"(?:model\.)?layers\.(\d+)\.(?:mlp|block_sparse_moe)"
_W = r"\.(weight|bias)"
#: mixture-of-experts tensors. Each expert's own (``mlp.experts.E.gate_proj.weight`` in
#: transformers checkpoints, ``block_sparse_moe.experts.E.w1`` in Mixtral's) are
#: ``layers.N.experts.E.<gate|up|down>``; all experts' stacked into one 3-d tensor are
#: ``layers.N.experts_<gate|up|down|gate_up>``: llama.cpp's ``ffn_*_exps``, transformers 5's
#: fused ``experts.gate_up_proj`` and ``experts.down_proj`` (parameters with no ``.weight``),
#: vLLM's and SGLang's ``experts.w13_weight`` and ``w2_weight``. The router is ``router``; a
#: shared expert's tensors (Qwen2-MoE's ``shared_expert``, DeepSeek's ``shared_experts``,
#: llama.cpp's ``ffn_*_shexp``) are ``shexp_<gate|up|down>``, its gate ``shexp_router``.
MOE = WeightTable("moe", tuple((re.compile(pattern), template) for pattern, template in (
    (_MOE_BLOCK + r"\.experts\.(\d+)\.(?:gate_proj|w1)" + _W, "layers.{0}.experts.{1}.gate.{2}"),
    (_MOE_BLOCK + r"\.experts\.(\d+)\.(?:up_proj|w3)" + _W, "layers.{0}.experts.{1}.up.{2}"),
    (_MOE_BLOCK + r"\.experts\.(\d+)\.(?:down_proj|w2)" + _W, "layers.{0}.experts.{1}.down.{2}"),
    (_MOE_BLOCK + r"\.experts\.(?:gate_up_proj|w13_weight)()", "layers.{0}.experts_gate_up.weight"),
    (_MOE_BLOCK + r"\.experts\.(?:down_proj|w2_weight)()", "layers.{0}.experts_down.weight"),
    (_MOE_BLOCK + r"\.gate" + _W, "layers.{0}.router.{1}"),
    (_MOE_BLOCK + r"\.shared_experts?\.gate_proj" + _W, "layers.{0}.shexp_gate.{1}"),
    (_MOE_BLOCK + r"\.shared_experts?\.up_proj" + _W, "layers.{0}.shexp_up.{1}"),
    (_MOE_BLOCK + r"\.shared_experts?\.down_proj" + _W, "layers.{0}.shexp_down.{1}"),
    (_MOE_BLOCK + r"\.shared_expert_gate" + _W, "layers.{0}.shexp_router.{1}"),
    (r"blk\.(\d+)\.ffn_gate_shexp" + _W, "layers.{0}.shexp_gate.{1}"),
    (r"blk\.(\d+)\.ffn_up_shexp" + _W, "layers.{0}.shexp_up.{1}"),
    (r"blk\.(\d+)\.ffn_down_shexp" + _W, "layers.{0}.shexp_down.{1}"),
    (r"blk\.(\d+)\.ffn_gate_inp_shexp" + _W, "layers.{0}.shexp_router.{1}"),
    (r"blk\.(\d+)\.ffn_gate_exps" + _W, "layers.{0}.experts_gate.{1}"),
    (r"blk\.(\d+)\.ffn_up_exps" + _W, "layers.{0}.experts_up.{1}"),
    (r"blk\.(\d+)\.ffn_down_exps" + _W, "layers.{0}.experts_down.{1}"),
    (r"blk\.(\d+)\.ffn_gate_inp" + _W, "layers.{0}.router.{1}"),
)))

TABLES: tuple[WeightTable, ...] = (GGUF, TRANSFORMERS, META_LLAMA, MOE)

_LAYER = re.compile(r"layers\.(\d+)\.")


def unwrap(name: str) -> str:
    """``name`` without wrapper prefixes and PEFT's ``.base_layer``."""
    stripped = True
    while stripped:
        stripped = False
        for prefix in WRAPPERS:
            if name.startswith(prefix):
                name, stripped = name[len(prefix):], True
    return name.replace(".base_layer.", ".")


def canonical_weight(name: str) -> tuple[str, bool]:
    """(pairing key, known): the canonical name if a table knows ``name``, else the name
    itself, unwrapped."""
    bare = unwrap(name)
    for table in TABLES:
        found = table.lookup(bare)
        if found is not None:
            return found, True
    return bare, False


def layer_index(canonical: str) -> int | None:
    """N for a canonical ``layers.N.*`` name, else None."""
    m = _LAYER.match(canonical)
    return int(m.group(1)) if m else None


def role(canonical: str) -> str:
    """The op of a canonical name: ``q`` for ``layers.3.q.weight``, ``embed`` for
    ``embed.weight``."""
    parts = canonical.split(".")
    return parts[2] if parts[0] == "layers" and len(parts) > 3 else parts[0]


_TO_TRANSFORMERS = {**{role: own for own, role in reversed(_TRANSFORMERS_GLOBAL.items())},
                    **{role: own for own, role in reversed(_TRANSFORMERS_LAYER.items())}}


def transformers_name(canonical: str) -> str | None:
    """The transformers module name of a canonical name without its ``.weight``/``.bias``
    (``layers.3.q`` is ``model.layers.3.self_attn.q_proj``), or None if it has none."""
    parts = canonical.split(".")
    if parts[0] == "layers" and len(parts) == 3 and parts[2] in _TO_TRANSFORMERS:
        return f"model.layers.{parts[1]}.{_TO_TRANSFORMERS[parts[2]]}"
    if len(parts) == 1 and parts[0] in _TO_TRANSFORMERS:
        return _TO_TRANSFORMERS[parts[0]]
    return None
