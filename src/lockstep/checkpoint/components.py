"""Which part of the model a tensor belongs to: ordered (regex, component) rules.

The first rule whose regex is found in the name wins; user rules go before the defaults.
Defaults know transformers' names (``model.layers.N.self_attn.q_proj.weight``), GGUF's
(``blk.N.attn_q.weight``) and PEFT's (``...q_proj.lora_A.weight``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Iterable, Sequence

from ..errors import UsageError

__all__ = ["COMPONENTS", "DEFAULT_RULES", "ComponentRules"]

#: every default component, in the order the summary lists them
COMPONENTS = ("embeddings", "attention", "mlp", "norms", "shared experts", "routed experts",
              "router", "lm_head", "lora A", "lora B", "other")

DEFAULT_RULES: tuple[tuple[str, str], ...] = (
    (r"lora_A|lora_down", "lora A"),
    (r"lora_B|lora_up", "lora B"),
    (r"shared_expert|_shexp", "shared experts"),
    (r"experts\.\d+\.|_exps\b", "routed experts"),
    (r"\.router\.|block_sparse_moe\.gate\.|mlp\.gate\.(weight|bias)$|ffn_gate_inp", "router"),
    (r"embed_tokens|\bwte\b|\bwpe\b|token_embd|embeddings?\b", "embeddings"),
    (r"(^|\.)lm_head\.|^output\.", "lm_head"),
    (r"norm|(^|\.)ln_", "norms"),
    (r"\b[qkvo]_proj\b|self_attn|attn_|\.attention\.|\bc_attn\b", "attention"),
    (r"\b(gate|up|down)_proj\b|\.mlp\.|ffn_|\bc_fc\b", "mlp"),
)


@dataclass
class ComponentRules:
    """Ordered rules; ``component(name)`` is the first match's component, else "other"."""

    rules: list[tuple[re.Pattern[str], str]] = field(default_factory=list)

    @classmethod
    def build(cls, overrides: Iterable[str | tuple[str, str]] = (),
              defaults: Sequence[tuple[str, str]] = DEFAULT_RULES) -> "ComponentRules":
        """``overrides`` are ``"REGEX=COMPONENT"`` strings or pairs, tried before the defaults."""
        pairs: list[tuple[str, str]] = []
        for item in overrides:
            if isinstance(item, str):
                regex, sep, comp = item.rpartition("=")
                if not sep or not regex or not comp.strip():
                    raise UsageError(f"--group wants REGEX=COMPONENT, got {item!r}")
                item = (regex, comp.strip())
            pairs.append(item)
        compiled = []
        for regex, comp in [*pairs, *defaults]:
            try:
                compiled.append((re.compile(regex), comp))
            except re.error as exc:
                raise UsageError(f"bad regular expression {regex!r}: {exc}") from None
        return cls(compiled)

    def component(self, name: str) -> str:
        for pattern, comp in self.rules:
            if pattern.search(name):
                return comp
        return "other"
