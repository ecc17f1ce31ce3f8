"""Which part of the model a tensor belongs to: ordered (regex, component) rules.

The first rule whose regex is found in the name wins; user rules go before the defaults.
Defaults know transformers' names (``model.layers.N.self_attn.q_proj.weight``), GGUF's
(``blk.N.attn_q.weight``) and PEFT's (``...q_proj.lora_A.weight``).

A LoRA tensor belongs to the component of the module it adapts (its name without the
``lora_A...`` part): ``...mlp.shared_experts.up_proj.lora_B.weight`` is a shared experts
tensor; which LoRA matrix it is (``adapter``: "lora A" or "lora B") is a second dimension.
User rules see the whole name, so a ``--group`` rule can still single out lora_B.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Iterable, Sequence

from ..errors import UsageError

__all__ = ["COMPONENTS", "DEFAULT_RULES", "ADAPTERS", "ComponentRules", "adapter_of",
           "adapted_module"]

#: every default component, in the order the summary lists them
COMPONENTS = ("embeddings", "attention", "mlp", "norms", "shared experts", "routed experts",
              "router", "lm_head", "other")
#: the LoRA matrices, the second dimension of an adapter's table
ADAPTERS = (("lora A", re.compile(r"\.(lora_A|lora_down|lora_embedding_A)(\.|$)")),
            ("lora B", re.compile(r"\.(lora_B|lora_up|lora_embedding_B)(\.|$)")))

DEFAULT_RULES: tuple[tuple[str, str], ...] = (
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
    user: int = 0  #: how many of ``rules`` came from the user (they see the whole name)

    @classmethod
    def build(cls, overrides: Iterable[str | tuple[str, str]] = (),
              defaults: Sequence[tuple[str, str]] = DEFAULT_RULES) -> ComponentRules:
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
        return cls(compiled, len(pairs))

    def component(self, name: str) -> str:
        """The component of a tensor; a LoRA tensor's is that of the module it adapts."""
        module = adapted_module(name)
        for i, (pattern, comp) in enumerate(self.rules):
            if pattern.search(name if i < self.user else module):
                return comp
        return "other"


def adapter_of(name: str) -> str | None:
    """"lora A" or "lora B" for a LoRA tensor's name, else None."""
    return next((which for which, pattern in ADAPTERS if pattern.search(name)), None)


def adapted_module(name: str) -> str:
    """The name of the module a LoRA tensor adapts (``base_model.model.`` and the LoRA part
    left out); other names unchanged."""
    for _, pattern in ADAPTERS:
        m = pattern.search(name)
        if m is not None:
            return name[:m.start()].removeprefix("base_model.model.")
    return name
