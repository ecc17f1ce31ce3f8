"""Canonical ops (the part of a canonical name after ``layers.N.``) the diagnosis groups:
norms, attention outputs, RoPE tables, and which ops feed each op."""

from __future__ import annotations

from ..align.kinds import Kind as K

__all__ = ["NORMS", "ATTN_OUT", "ROPE_TABLES", "INPUT_OF"]

#: ops that are norms, attention outputs, RoPE tables
NORMS = (K.Q_NORM, K.K_NORM, K.ATTN_NORM, K.MLP_NORM, K.FINAL_NORM)
ATTN_OUT = (K.ATTN_PROBS, K.ATTN_HEADS, K.ATTN, K.ATTN_OUT)
ROPE_TABLES = (K.ROPE_COS, K.ROPE_SIN)  # the RoPE tables of this step's positions
#: the ops an op's input may be, in preference order (same layer)
INPUT_OF: dict[str, tuple[str, ...]] = {
    K.EMBED: (K.INPUT_IDS,), K.Q: (K.ATTN_NORM,), K.K: (K.ATTN_NORM,), K.V: (K.ATTN_NORM,),
    K.Q_NORM: (K.Q,), K.K_NORM: (K.K,), K.Q_ROPE: (K.Q_NORM, K.Q), K.K_ROPE: (K.K_NORM, K.K),
    K.ATTN_HEADS: (K.V, K.K_ROPE, K.K), K.ATTN: (K.V, K.K_ROPE, K.K),
    K.ATTN_OUT: (K.ATTN_HEADS, K.V), K.ATTN_RESIDUAL: (K.ATTN_OUT,),
    K.MLP_NORM: (K.ATTN_RESIDUAL, K.ATTN_OUT), K.GATE: (K.MLP_NORM,), K.UP: (K.MLP_NORM,),
    K.GATE_ACT: (K.GATE,), K.ACT: (K.GATE_ACT, K.UP, K.GATE), K.DOWN: (K.ACT, K.UP),
    K.MLP_OUT: (K.DOWN, K.ACT), "mlp": (K.ACT, K.UP), K.OUT: (K.MLP_OUT, K.DOWN, "mlp"),
    K.LOGITS: (K.FINAL_NORM,), K.ROUTER: (K.MLP_NORM,), K.EXPERTS_OUT: (K.MLP_NORM,),
}
