"""The attention constants of a transformers config that the diagnosis re-enacts attention
with: the score scale (Gemma's query_pre_attn_scalar), the soft cap, the sliding window and
the layers it is on. Only what the config sets is given."""

from __future__ import annotations

from typing import Any

__all__ = ["attention_meta"]


def attention_meta(config: Any) -> dict[str, Any]:
    """``attn_scale``, ``attn_softcap``, ``sliding_window`` and ``sliding_layers``, where set."""
    if config is None:
        return {}
    meta: dict[str, Any] = {}
    scalar = getattr(config, "query_pre_attn_scalar", None)
    if scalar:
        meta["attn_scale"] = float(scalar) ** -0.5
    cap = getattr(config, "attn_logit_softcapping", None)
    if cap:
        meta["attn_softcap"] = float(cap)
    window = getattr(config, "sliding_window", None)
    if window and getattr(config, "use_sliding_window", True) is not False:
        types = getattr(config, "layer_types", None)
        layers = getattr(config, "num_hidden_layers", 0) or 0
        sliding = ([i for i, t in enumerate(types) if t == "sliding_attention"] if types
                   else list(range(layers)))
        if sliding:
            meta.update(sliding_window=int(window), sliding_layers=sliding)
    return meta
