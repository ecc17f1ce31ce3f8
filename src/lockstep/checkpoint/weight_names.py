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
parts stacked by rows (checkpoint/fused.py).

Wrapper prefixes (``base_model.model.`` from PEFT,
``module.`` from DDP, ``_orig_mod.`` from torch.compile) and PEFT's ``.base_layer`` are
ignored. A name no table knows pairs with the same name on the other side.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

__all__ = ["WeightTable", "TABLES", "WRAPPERS", "unwrap", "canonical_weight", "layer_index",
           "ROPE_ROWS", "FUSED", "role", "transformers_name"]

#: prefixes that wrappers put before the wrapped model's own names
WRAPPERS = ("base_model.model.", "module.", "_orig_mod.")

#: fused roles (vLLM, SGLang, Phi-3): the parts stacked by rows, in order (checkpoint/fused.py)
FUSED = {"qkv": ("q", "k", "v"), "gate_up": ("gate", "up")}

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

TABLES: tuple[WeightTable, ...] = (GGUF, TRANSFORMERS, META_LLAMA)

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
