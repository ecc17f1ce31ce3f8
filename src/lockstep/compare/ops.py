"""Canonical ops (the part of a canonical name after ``layers.N.``) the diagnosis groups:
norms, attention outputs, RoPE tables, and which ops feed each op."""

from __future__ import annotations

__all__ = ["NORMS", "ATTN_OUT", "ROPE_TABLES", "INPUT_OF"]

#: ops that are norms, attention outputs, RoPE tables
NORMS = ("q_norm", "k_norm", "attn_norm", "mlp_norm", "final_norm")
ATTN_OUT = ("attn_probs", "attn_heads", "attn", "attn_out")
ROPE_TABLES = ("rope_cos", "rope_sin")  # the RoPE tables of this step's positions
#: the ops an op's input may be, in preference order (same layer)
INPUT_OF: dict[str, tuple[str, ...]] = {
    "embed": ("input_ids",), "q": ("attn_norm",), "k": ("attn_norm",), "v": ("attn_norm",),
    "q_norm": ("q",), "k_norm": ("k",), "q_rope": ("q_norm", "q"), "k_rope": ("k_norm", "k"),
    "attn_heads": ("v", "k_rope", "k"), "attn": ("v", "k_rope", "k"),
    "attn_out": ("attn_heads", "v"), "attn_residual": ("attn_out",),
    "mlp_norm": ("attn_residual", "attn_out"), "gate": ("mlp_norm",), "up": ("mlp_norm",),
    "gate_act": ("gate",), "act": ("gate_act", "up", "gate"), "down": ("act", "up"),
    "mlp_out": ("down", "act"), "mlp": ("act", "up"), "out": ("mlp_out", "down", "mlp"),
    "logits": ("final_norm",),
}
