"""Tensor kinds: the one list of what a recorded tensor can hold, and its canonical names.

Each engine names its tensors its own way; the name tables (align/tables.py) list every
engine's names against a ``Kind``. Pairing, diagnosis and the reports match on ``Kind``, never
on an engine's name. ``Kind`` is a ``str`` enum whose values are the canonical op names, so a
kind compares, hashes, prints and serialises as its canonical name.

A canonical name is ``[layers.N.][scope.]<kind>``; the scopes are a MoE layer's ``experts.E``
(expert E, its tokens only), ``experts`` (every routed (token, expert) row at once) and
``shared_expert``:

| canonical | meaning |
|---|---|
| ``input_ids`` | token ids fed at this step |
| ``tok_embed`` | token embedding rows, where they differ from ``embed`` (GPT-2) |
| ``pos_embed`` | learned position embeddings (GPT-2) |
| ``embed`` | the hidden state entering the first layer (Gemma: scaled by sqrt(hidden)) |
| ``rope_cos`` / ``rope_sin`` | the RoPE tables of this step's positions |
| ``layers.N.attn_norm`` | the norm before attention |
| ``layers.N.qkv`` | a fused Q/K/V projection (Phi-3 ``qkv_proj``, GPT-2 ``c_attn``) |
| ``layers.N.q`` / ``.k`` / ``.v`` | Q, K, V projections (before any norm or RoPE) |
| ``layers.N.q_norm`` / ``.k_norm`` | per-head norms of Q and K (Qwen3, Gemma 3) |
| ``layers.N.q_rope`` / ``.k_rope`` | Q and K after RoPE |
| ``layers.N.attn_probs`` | attention probabilities (batch, heads, tokens, keys) |
| ``layers.N.attn_heads`` | attention output, heads merged, before the output projection |
| ``layers.N.attn_out`` | after the output projection |
| ``layers.N.attn_post_norm`` | the norm of the attention output (Gemma) |
| ``layers.N.attn_residual`` | residual sum before the MLP |
| ``layers.N.mlp_norm`` | the norm before the MLP |
| ``layers.N.gate_up`` | a fused gate and up projection (Phi-3 ``gate_up_proj``) |
| ``layers.N.gate`` / ``.up`` | MLP gate and up projections (GPT-2's ``c_fc`` is ``up``) |
| ``layers.N.gate_act`` | the activation of the gate alone (silu(gate)) |
| ``layers.N.act`` | the input of the down projection (SwiGLU: silu(gate) * up) |
| ``layers.N.down`` | MLP down projection |
| ``layers.N.router`` | MoE router logits (tokens, experts) |
| ``layers.N.expert_weights`` / ``.expert_ids`` | the chosen experts' weights and ids |
| ``layers.N.experts.E.<op>`` | expert E's ``gate``, ``up``, ``act``, ``down`` (its tokens only) |
| ``layers.N.experts.gate_act`` | silu(gate) of every routed (token, expert) row at once |
| ``layers.N.experts_out`` | the routed experts' weighted sum |
| ``layers.N.shared_expert.<op>`` | the shared expert's ``gate``, ``gate_act``, ``up``, ``act``, |
| | ``down`` and ``out`` |
| ``layers.N.shared_expert_gate`` | the shared expert's gate logit |
| ``layers.N.shared_expert_gate_prob`` | its sigmoid (llama.cpp's ``ffn_shexp_gate``) |
| ``layers.N.mlp_out`` | the MLP block's output (dense: ``down``'s values; MoE: the experts' |
| | sum plus the shared expert) |
| ``layers.N.mlp_post_norm`` | the norm of the MLP output (Gemma) |
| ``layers.N.out`` | layer output (residual sum after the MLP) |
| ``final_norm`` | the last norm |
| ``logits`` | the logits |

Two kinds are never in a table, only guessed from an unknown engine's names (``guess``):
``positions`` (position ids) and ``attn`` (an attention block's output, not saying which).
"""

from __future__ import annotations

import re
from enum import Enum
from typing import NamedTuple

__all__ = ["Kind", "Canonical", "parse", "split_layer", "kind_of", "check_template", "guess",
           "named_kind", "FED_NAMES"]


class Kind(str, Enum):
    """What a tensor holds; the value is its canonical op name (see the module doc)."""

    INPUT_IDS = "input_ids"
    POSITIONS = "positions"
    TOK_EMBED = "tok_embed"
    POS_EMBED = "pos_embed"
    EMBED = "embed"
    ROPE_COS = "rope_cos"
    ROPE_SIN = "rope_sin"
    ATTN_NORM = "attn_norm"
    QKV = "qkv"
    Q = "q"
    K = "k"
    V = "v"
    Q_NORM = "q_norm"
    K_NORM = "k_norm"
    Q_ROPE = "q_rope"
    K_ROPE = "k_rope"
    ATTN = "attn"
    ATTN_PROBS = "attn_probs"
    ATTN_HEADS = "attn_heads"
    ATTN_OUT = "attn_out"
    ATTN_POST_NORM = "attn_post_norm"
    ATTN_RESIDUAL = "attn_residual"
    MLP_NORM = "mlp_norm"
    GATE_UP = "gate_up"
    GATE = "gate"
    UP = "up"
    GATE_ACT = "gate_act"
    ACT = "act"
    DOWN = "down"
    ROUTER = "router"
    EXPERT_WEIGHTS = "expert_weights"
    EXPERT_IDS = "expert_ids"
    EXPERTS_OUT = "experts_out"
    SHARED_EXPERT_GATE = "shared_expert_gate"
    SHARED_EXPERT_GATE_PROB = "shared_expert_gate_prob"
    MLP_OUT = "mlp_out"
    MLP_POST_NORM = "mlp_post_norm"
    OUT = "out"
    FINAL_NORM = "final_norm"
    LOGITS = "logits"

    # a kind is its canonical name wherever a string is: in dicts, f-strings and JSON
    __hash__ = str.__hash__

    def __str__(self) -> str:
        return str(self.value)

    def __format__(self, spec: str) -> str:
        return format(str(self.value), spec)


class Canonical(NamedTuple):
    """A canonical name's parts."""

    layer: int | None
    scope: str  #: "", "experts", "experts.E" or "shared_expert"
    kind: Kind

    @property
    def op(self) -> str:
        """The name after ``layers.N.``: the kind itself outside a scope."""
        return f"{self.scope}.{self.kind.value}" if self.scope else self.kind


_IN_LAYER = re.compile(r"layers\.(\d+)\.(.+)")
_SCOPED = re.compile(r"(?:(experts(?:\.\d+)?|shared_expert)\.)?(\w+)")
_KINDS = {k.value: k for k in Kind}


def split_layer(canonical: str) -> tuple[int | None, str]:
    """(N, the rest) of ``layers.N.<rest>``; (None, the name) outside the layers."""
    m = _IN_LAYER.fullmatch(canonical)
    return (int(m.group(1)), m.group(2)) if m else (None, canonical)


def parse(canonical: str) -> Canonical | None:
    """The parts of a canonical name, or None if it is not one."""
    layer, rest = split_layer(canonical)
    m = _SCOPED.fullmatch(rest)
    if m is None or m.group(2) not in _KINDS:
        return None
    return Canonical(layer, m.group(1) or "", _KINDS[m.group(2)])


def kind_of(canonical: str | None) -> Kind | None:
    """The kind a canonical name stands for (in any scope), or None."""
    parts = parse(canonical) if canonical else None
    return parts.kind if parts else None


def check_template(template: str) -> Canonical:
    """A name table's canonical template (``"layers.{0}.experts.{1}.gate"``) checked against
    ``Kind``: its parts, or ValueError for a template that names no kind."""
    parts = parse(re.sub(r"\{\d+\}", "0", template))
    if parts is None:
        raise ValueError(f"canonical template {template!r} names no tensor kind "
                         "(lockstep.align.kinds.Kind)")
    return parts


# -- names no table knows ---------------------------------------------------------------------
#: the names engines give the ids and positions fed at a step, whole (align.steps reads them)
FED_NAMES = {Kind.INPUT_IDS: ("input_ids", "tokens", "token_ids", "ids", "inp_tokens"),
             Kind.POSITIONS: ("positions", "position_ids", "pos", "inp_pos")}
#: the last part of a name (after "." or ":") that says what the tensor is in any engine
_NAMED = {Kind.LOGITS: ("logits", "lm_head", "result_output", "output_logits")}
_NAMED_RE = {kind: re.compile(r"(^|[.:])(" + "|".join(map(re.escape, words)) + ")$")
             for kind, words in _NAMED.items()}


def named_kind(name: str) -> Kind | None:
    """The kind a name's last part says in any engine (``lm_head``, ``x:logits``,
    ``result_output`` are logits), or None."""
    return next((kind for kind, pattern in _NAMED_RE.items() if pattern.search(name)), None)


_LAYER = re.compile(r"(?:^|[^a-z])(?:layers?|blk|block|l)[._\-]?(\d+)(?=[._:/\-]|$)"
                    r"|-(\d+)(?::|$)")
#: words that name Q, K and V (Meta's xq/wq), RoPE, norms and embeddings in unknown engines
_QKV_WORDS = ((Kind.Q, {"q", "query", "xq", "wq"}), (Kind.K, {"k", "key", "xk", "wk"}),
              (Kind.V, {"v", "value", "xv", "wv"}))
_ROPE_OF = {Kind.Q: Kind.Q_ROPE, Kind.K: Kind.K_ROPE}
_NORM_OF = {Kind.Q: Kind.Q_NORM, Kind.K: Kind.K_NORM}
_ROPE_WORDS = {"rope", "rotary", "rot"}
_QK_NORM_WORDS = {"norm", "layernorm"}
_NORM_WORDS = {"norm", "layernorm", "rmsnorm"}
_INPUT_WORDS = {"in", "inp", "input"}  # a block's input: ``attn_in``, ``ffn_inp``
_EMBED_WORDS = {"embed", "embedding", "embeddings", "embd", "wte"}
_ROPE_TABLE_WORDS = {"cos", "sin", "freqs"}


def guess(name: str) -> tuple[int | None, Kind | None]:
    """(layer, kind) a recorded name stands for when no name table knows it: from the words
    engines commonly use. Either may be None."""
    n = name.lower()
    words = set(re.findall(r"[a-z]+", n))
    m = _LAYER.search(n)
    layer = int(m.group(1) or m.group(2)) if m else None
    qkv = next((kind for kind, keys in _QKV_WORDS if words & keys), None)
    kind: Kind | None = None
    if "input_ids" in n or "token_ids" in n:
        kind = Kind.INPUT_IDS
    elif re.search(r"position|(?<![a-z])pos(?![a-z])", n):
        kind = Kind.POSITIONS
    elif ("rotary" in words and "emb" in words) or words & _ROPE_TABLE_WORDS:
        kind = Kind.ROPE_SIN if "sin" in words or n.endswith(":1") else Kind.ROPE_COS
    elif qkv is not None and qkv in _ROPE_OF and words & _ROPE_WORDS:
        kind = _ROPE_OF[qkv]
    elif qkv is not None and qkv in _NORM_OF and words & _QK_NORM_WORDS:
        kind = _NORM_OF[qkv]
    elif "logits" in words or {"lm", "head"} <= words:
        kind = Kind.LOGITS
    elif words & _EMBED_WORDS:
        kind = Kind.EMBED
    elif qkv is not None:
        kind = qkv
    elif words & _NORM_WORDS:
        kind = Kind.FINAL_NORM if layer is None else Kind.ATTN_NORM
    elif layer is not None and words & _INPUT_WORDS and words & {"attn", "attention"}:
        kind = Kind.ATTN_NORM  # a layer's attention input (``L0.attn_in``): its norm's output
    elif layer is not None and words & _INPUT_WORDS and words & {"ffn", "mlp"}:
        kind = Kind.MLP_NORM
    elif {"o", "proj"} <= words:
        kind = Kind.ATTN_OUT
    elif words & {"attn", "attention"}:
        kind = Kind.ATTN
    return layer, kind
