"""The zoo model's hyperparameters, read from a transformers ``config.json``."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping

from ..errors import UsageError
from .families import NEW_FAMILIES, FamilyArgs, family_args, family_of, rope_parameters

__all__ = ["ModelArgs", "FAMILIES", "MOE_FAMILIES"]

#: the dense zoo families it can run (families.py: what each adds)
FAMILIES = ("llama", "qwen3") + NEW_FAMILIES
#: the mixture-of-experts families (moe.py; their dense parts read as above)
MOE_FAMILIES = ("qwen3_moe", "qwen2_moe")
#: every family the zoo scores, dense then MoE
ZOO_FAMILIES = FAMILIES + MOE_FAMILIES


def _rope_theta(config: Mapping[str, Any]) -> float:
    """rope_theta from a config of any transformers version (top level or rope_parameters)."""
    params = rope_parameters(config)  # Gemma 3: the global layers'
    return float(config.get("rope_theta") or params.get("rope_theta") or 10000.0)


@dataclass(frozen=True)
class ModelArgs:
    """Sizes and constants of a Llama or Qwen3 model, named as Meta's reference code names
    them."""

    family: str  #: a zoo family, one of FAMILIES
    dim: int  #: hidden size
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    hidden_dim: int  #: the MLP's intermediate size
    vocab_size: int
    norm_eps: float
    rope_theta: float
    tie_embeddings: bool  #: lm_head shares the embedding matrix
    attention_bias: bool = False
    bug: str | None = None  #: the zoo bug switched on, if any
    extra: FamilyArgs = field(default_factory=FamilyArgs)  #: what the family adds

    @property
    def qk_norm(self) -> bool:
        """Whether Q and K are RMS-normalised per head before RoPE (Qwen3, Gemma 3)."""
        return self.family.startswith("qwen3") or self.extra.qk_norm

    @classmethod
    def from_config(cls, config: Mapping[str, Any], bug: str | None = None) -> ModelArgs:
        """The arguments of a transformers config (``config.json`` as a dict)."""
        family = family_of(config)
        if family not in FAMILIES:
            raise UsageError(f"the zoo engine runs {', '.join(FAMILIES)} models; this one "
                             f"is {config.get('model_type')!r}")
        n_heads = int(config["num_attention_heads"])
        head_dim = int(config.get("head_dim") or config["hidden_size"] // n_heads)
        return cls(
            family=family,
            dim=int(config["hidden_size"]),
            n_layers=int(config["num_hidden_layers"]),
            n_heads=n_heads,
            n_kv_heads=int(config.get("num_key_value_heads") or n_heads),
            head_dim=head_dim,
            hidden_dim=int(config["intermediate_size"]),
            vocab_size=int(config["vocab_size"]),
            norm_eps=float(config.get("rms_norm_eps", 1e-6)),
            rope_theta=_rope_theta(config),
            tie_embeddings=bool(config.get("tie_word_embeddings", False)),
            attention_bias=bool(config.get("attention_bias", family == "qwen2")),
            bug=bug,
            extra=family_args(config, family, head_dim),
        )
