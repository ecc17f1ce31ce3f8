"""Name tables: each engine's recorded names mapped to one canonical name per transformer op.

Canonical names (``layers.N.<op>`` for per-layer ops) are what two engines' records are paired
by when their own names differ. A rule can also name a layout transform that brings its
engine's tensor into the canonical layout (transformers' layout).

| canonical | meaning |
|---|---|
| ``input_ids`` | token ids fed at this step |
| ``embed`` | token embeddings |
| ``layers.N.attn_norm`` | RMSNorm before attention |
| ``layers.N.q`` / ``.k`` / ``.v`` | Q, K, V projections (before RoPE) |
| ``layers.N.attn_heads`` | attention output, heads merged, before the output projection |
| ``layers.N.attn_out`` | after the output projection |
| ``layers.N.attn_residual`` | residual sum before the MLP |
| ``layers.N.mlp_norm`` | RMSNorm before the MLP |
| ``layers.N.gate`` / ``.up`` | MLP gate and up projections |
| ``layers.N.act`` | the activation product (SwiGLU: silu(gate) * up) |
| ``layers.N.down`` | MLP down projection |
| ``layers.N.out`` | layer output (residual sum after the MLP) |
| ``final_norm`` | the last norm |
| ``logits`` | the logits |
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Iterable

__all__ = ["Rule", "NameTable", "TABLES", "detect_table"]


@dataclass(frozen=True)
class Rule:
    """One engine name pattern and the canonical name it stands for."""

    pattern: re.Pattern[str]  #: full match on the recorded name; groups fill ``canonical``
    canonical: str  #: template, e.g. "layers.{0}.q"
    transform: str | None = None  #: layout transform to the canonical layout (transforms.py)


def _rules(*items: tuple[str, str] | tuple[str, str, str]) -> tuple[Rule, ...]:
    out = []
    for item in items:
        pattern, canonical = item[0], item[1]
        transform = item[2] if len(item) > 2 else None
        out.append(Rule(re.compile(pattern), canonical, transform))
    return tuple(out)


@dataclass(frozen=True)
class NameTable:
    """The names one engine records, as canonical names."""

    name: str
    rules: tuple[Rule, ...]

    def lookup(self, recorded: str) -> tuple[str, str | None] | None:
        """(canonical name, transform) for a recorded name, or None if no rule knows it."""
        for rule in self.rules:
            m = rule.pattern.fullmatch(recorded)
            if m:
                return rule.canonical.format(*m.groups()), rule.transform
        return None

    def coverage(self, names: Iterable[str]) -> int:
        return sum(1 for n in names if self.lookup(n) is not None)


_L = r"model\.layers\.(\d+)"
TRANSFORMERS_LLAMA = NameTable("transformers-llama", _rules(
    (r"input_ids", "input_ids"),
    (r"model\.embed_tokens", "embed"),
    (_L + r"\.input_layernorm", "layers.{0}.attn_norm"),
    (_L + r"\.self_attn\.q_proj", "layers.{0}.q"),
    (_L + r"\.self_attn\.k_proj", "layers.{0}.k"),
    (_L + r"\.self_attn\.v_proj", "layers.{0}.v"),
    (_L + r"\.self_attn\.o_proj:input\.0", "layers.{0}.attn_heads"),
    (_L + r"\.self_attn\.o_proj", "layers.{0}.attn_out"),
    (_L + r"\.post_attention_layernorm:input\.0", "layers.{0}.attn_residual"),
    (_L + r"\.post_attention_layernorm", "layers.{0}.mlp_norm"),
    (_L + r"\.mlp\.gate_proj", "layers.{0}.gate"),
    (_L + r"\.mlp\.up_proj", "layers.{0}.up"),
    (_L + r"\.mlp\.down_proj:input\.0", "layers.{0}.act"),
    (_L + r"\.mlp\.down_proj", "layers.{0}.down"),
    (r"model\.layers\.(\d+)", "layers.{0}.out"),
    (r"model\.norm", "final_norm"),
    (r"lm_head", "logits"),
))

# llama.cpp's graph (llm_build_llama): a name repeated by later ops is recorded as "name:op".
# Its Q and K weights were permuted by the GGUF conversion so that llama.cpp's interleaved
# RoPE works; "rope_interleaved" undoes that permutation within each head.
LLAMA_CPP = NameTable("llama.cpp", _rules(
    (r"input_ids", "input_ids"),
    (r"(?:inp_)?embd", "embed"),
    (r"attn_norm-(\d+)", "layers.{0}.attn_norm"),
    (r"Qcur-(\d+)", "layers.{0}.q", "rope_interleaved"),
    (r"Kcur-(\d+)", "layers.{0}.k", "rope_interleaved"),
    (r"Vcur-(\d+)", "layers.{0}.v"),
    (r"kqv_out-(\d+)", "layers.{0}.attn_heads"),
    (r"attn_out-(\d+)", "layers.{0}.attn_out"),
    (r"ffn_inp-(\d+)", "layers.{0}.attn_residual"),
    (r"ffn_norm-(\d+)", "layers.{0}.mlp_norm"),
    (r"ffn_gate-(\d+)", "layers.{0}.gate"),
    (r"ffn_up-(\d+)", "layers.{0}.up"),
    (r"ffn_swiglu-(\d+)", "layers.{0}.act"),
    (r"ffn_out-(\d+)", "layers.{0}.down"),
    (r"l_out-(\d+)", "layers.{0}.out"),
    (r"result_norm", "final_norm"),
    (r"result_output", "logits"),
))

TABLES: tuple[NameTable, ...] = (TRANSFORMERS_LLAMA, LLAMA_CPP)


def detect_table(names: Iterable[str]) -> NameTable | None:
    """The table that knows most of a dump's names (at least a quarter of them), or None."""
    names = list(set(names))
    best = max(TABLES, key=lambda t: t.coverage(names))
    covered = best.coverage(names)
    return best if covered and covered * 4 >= len(names) else None
