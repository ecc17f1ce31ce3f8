"""A nano-vLLM-style engine for Qwen3, Qwen3-MoE, Llama and Gemma 2, written for lockstep's
acceptance tests.

It has the shapes real engines have and transformers does not: flat ``(tokens, hidden)``
activations (no batch dim), a fused ``qkv_proj`` (q, k, v rows stacked) and ``gate_up_proj``
(gate then up), an RMSNorm with the residual add fused in that returns
``(normed, residual)``, a paged KV cache written by slot mapping, ``compute_logits()``
called outside ``forward`` (the lm_head keeps only each sequence's last position at
prefill), and a ``Sampler`` module. Module names follow vLLM's model files.

Gemma 2 as vLLM's ``gemma2.py`` writes it: four norms per layer scaling by ``(1 + w)``, of
which ``pre_feedforward_layernorm`` adds the residual and ``post_attention_layernorm`` does
not; the embedding times sqrt(hidden); scores scaled by ``query_pre_attn_scalar`` and
soft-capped; a sliding window on the layers ``layer_types`` says; tanh-GELU; the logits
soft-capped after the lm_head.

Bugs, one switch each (``bug=``): ``decode_position`` (a decode token's position one too
far), ``kv_slot`` (decode writes K/V one slot past its own), ``swapped_args`` (the model
called as ``model(positions, input_ids)``), ``layer_not_loaded`` (layer 1 keeps random
weights), ``greedy_temperature`` (the sampler draws at temperature 1 when greedy was asked),
``swapped_kv_rows`` (the loader packs v_proj where k_proj goes in ``qkv_proj``, and k where v),
``moe_no_renormalize`` (the experts' top-k weights are not renormalized where the config asks),
``chunk_causal`` (a later prefill chunk masked with SDPA's ``is_causal``, which aligns
top-left when queries are fewer than keys), ``chunk_positions`` (a later chunk's positions
start from 0 again), ``batch_varlen`` (in a batch, a whole prompt attends over the step's
new keys from the batch's first token on, one causal mask for the flat batch: no
``cu_seqlens``), ``batch_last_index`` (in a batch, each sequence's logits are taken at its
first token, ``query_start_loc[:-1]``, not its last), ``rope_off`` (the rotary embedding
returns q and k unrotated), ``skip_layer`` (layer 1 runs and returns its inputs, its result
dropped).

``generate_batch`` runs several prompts as vLLM v1 does: one flat batch per step, the
running sequences' decode tokens first and then the prompts that join at that step (whole,
or a chunk of ``prefill_chunk`` tokens per step), attention per sequence by
``query_start_loc``, logits at each sequence's last token. It records what vLLM has: the
flat ``input_ids`` and ``positions``, and no word of which token is whose. With
``prefix_cache=1`` a prompt's full blocks are cached once computed, and a prompt joining
later that shares them computes only the tokens after; with ``cuda_graph=1`` a decode-only
batch is padded to vLLM's next captured graph size (1, 2, 4, then multiples of 8) with token
0 at position 0, its padding written to a null slot; with ``preempt=T`` the last decoding sequence
loses its KV blocks at batch step T and, as vLLM's recompute preemption does, is fed every
token again (prompt, decode tokens, and the next) as a prefill at the next step.

``prefix_cache=1`` keeps a prompt's full KV blocks after it is served, as vLLM's prefix
caching does: a prompt served again computes only the tokens after its cached blocks (the
``py:`` engine serves the prompt once, unrecorded, before the recorded run).

``speculative=K`` decodes speculatively, as vLLM's n-gram proposer does: each decode step
feeds the last token and up to K draft tokens (those that followed the latest earlier
occurrence of the last tokens), keeps the drafts the rows before them chose, and drops the
rest. In a batch too: a decoding sequence's segment of the flat batch is its token and its
drafts, and every row of it is sampled (vLLM's ``logits_indices``). ``proposer=forced``
(batches under teacher forcing) proposes the next forced token, kept, then wrong ones.

``prefill_chunk=N`` feeds the prompt in chunks of N tokens, one forward each, as vLLM's and
SGLang's chunked prefill do: a later chunk writes its K/V into the cache and attends over
the cached earlier chunks and its own tokens.

Qwen3-MoE as vLLM's ``qwen3_moe.py`` writes it: the router a ``ReplicatedLinear`` returning
``(logits, None)``, the experts one ``FusedMoE`` module holding every expert's weights in
``w13_weight`` and ``w2_weight``, called with the router's logits.

``vocab_multiple=N`` pads the vocabulary to a multiple of N rows, as vLLM's
``VocabParallelEmbedding`` and ``ParallelLMHead`` do (64 by default there): the padding rows
are zeros and the logits are cut back to the real vocabulary.
"""

from __future__ import annotations

import itertools
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Sequence

import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import Tensor, nn

import lockstep
from lockstep.engines import Engine

BUGS = ("decode_position", "kv_slot", "swapped_args", "layer_not_loaded", "greedy_temperature",
        "swapped_kv_rows", "moe_no_renormalize", "chunk_causal", "chunk_positions",
        "batch_varlen", "batch_last_index", "rope_off", "skip_layer")
BLOCK_SIZE = 4  # KV cache slots per block


@dataclass
class Context:
    """What one forward needs beyond ids and positions (vLLM keeps it in a global)."""

    is_prefill: bool = True
    slot_mapping: Tensor | None = None  # (tokens,): where each token's K/V is written
    block_table: Tensor | None = None  # (blocks,): the sequence's cache blocks
    context_len: int = 0  # tokens in the cache, this one included (decode)
    # a batch (vLLM v1's flat batch): each sequence's first token in the step's flat tokens
    # (and the end), its tokens in the cache after the step, its block table, and the rows
    # the logits are taken from (each sequence's last token)
    query_start_loc: list[int] | None = None
    seq_lens: list[int] = field(default_factory=list)
    block_tables: list[Tensor] = field(default_factory=list)
    logits_rows: Tensor | None = None


_CONTEXT = Context()


class RMSNorm(nn.Module):
    """RMSNorm; with ``residual`` it adds it first and returns ``(normed, residual sum)``."""

    def __init__(self, size: int, eps: float, offset: bool = False) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps
        self.offset = offset  # Gemma: the weight holds the scale minus one

    def _norm(self, x: Tensor) -> Tensor:
        var = x.float().pow(2).mean(-1, keepdim=True)
        normed = x.float() * torch.rsqrt(var + self.eps)
        if self.offset:
            return (normed * (1.0 + self.weight.float())).to(x.dtype)
        return normed.to(x.dtype) * self.weight

    def forward(self, x: Tensor, residual: Tensor | None = None) -> Any:
        if residual is None:
            return self._norm(x)
        x = x + residual
        return self._norm(x), x


class RotaryEmbedding(nn.Module):
    """Half-split RoPE on (tokens, heads, head_dim) q and k, by position."""

    def __init__(self, head_dim: int, base: float, bug: str | None = None) -> None:
        super().__init__()
        self.head_dim, self.bug = head_dim, bug
        inv = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float) / head_dim))
        self.register_buffer("inv_freq", inv, persistent=False)

    def _rotate(self, x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
        half = self.head_dim // 2
        x1, x2 = x[..., :half], x[..., half:]
        return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), -1).to(x.dtype)

    def forward(self, positions: Tensor, q: Tensor, k: Tensor) -> tuple[Tensor, Tensor]:
        if self.bug == "rope_off":  # the rotation never applied: q and k as they came
            return q.clone(), k.clone()
        freqs = positions.float()[:, None] * self.inv_freq[None]
        cos, sin = freqs.cos()[:, None].to(q.dtype), freqs.sin()[:, None].to(q.dtype)
        return self._rotate(q, cos, sin), self._rotate(k, cos, sin)


class Attention(nn.Module):
    """Writes K/V into the paged cache by slot, then attends: prefill over its own tokens
    (causal), decode over the sequence's blocks."""

    def __init__(self, n_heads: int, n_kv_heads: int, head_dim: int, bug: str | None,
                 scale: float | None = None, softcap: float | None = None,
                 window: int | None = None) -> None:
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = n_heads, n_kv_heads, head_dim
        self.scale = scale or head_dim ** -0.5
        self.softcap, self.window = softcap, window  # Gemma 2
        self.k_cache = self.v_cache = torch.empty(0)
        self.bug = bug

    def forward(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        ctx = _CONTEXT
        slots = ctx.slot_mapping
        self.k_cache.view(-1, self.n_kv_heads, self.head_dim)[slots] = k
        self.v_cache.view(-1, self.n_kv_heads, self.head_dim)[slots] = v
        if ctx.query_start_loc is not None:
            return self._batched(ctx, q, k, v)
        mask: Tensor | None = None
        if ctx.is_prefill and ctx.context_len == q.shape[0]:  # a whole prompt at once
            keys, values, causal = k, v, True
        else:  # the sequence's cached tokens, block by block (decode, or a prefill chunk)
            keys = self.k_cache[ctx.block_table].reshape(-1, self.n_kv_heads,
                                                         self.head_dim)[:ctx.context_len]
            values = self.v_cache[ctx.block_table].reshape(-1, self.n_kv_heads,
                                                           self.head_dim)[:ctx.context_len]
            causal = False
            if q.shape[0] > 1:  # a later chunk of a prefill: query i sees keys up to its own
                if self.bug == "chunk_causal":  # SDPA's is_causal aligns top-left here
                    causal = True
                else:
                    first = ctx.context_len - q.shape[0]
                    mask = (torch.arange(ctx.context_len)[None]
                            <= torch.arange(first, ctx.context_len)[:, None])
        groups = self.n_heads // self.n_kv_heads
        keys = keys.repeat_interleave(groups, dim=1)
        values = values.repeat_interleave(groups, dim=1)
        if self.softcap is not None or self.window is not None:
            return self._capped(q, keys, values)
        out = F.scaled_dot_product_attention(q.transpose(0, 1), keys.transpose(0, 1),
                                             values.transpose(0, 1), attn_mask=mask,
                                             is_causal=causal, scale=self.scale)
        return out.transpose(0, 1)  # (tokens, heads, head_dim)

    def _batched(self, ctx: Context, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        """A flat batch, sequence by sequence (flash-attention's varlen kernel): each
        sequence's queries over its cached keys, query i seeing keys up to its own
        position."""
        groups = self.n_heads // self.n_kv_heads
        starts = ctx.query_start_loc or [0]
        outs = []
        for i, (a, b) in enumerate(itertools.pairwise(starts)):
            if self.bug == "batch_varlen" and ctx.seq_lens[i] == b - a:
                # a whole prompt attends over the step's new keys from the batch's first
                # token on, under one causal mask: the kernel was not given cu_seqlens
                keys, values = k[:b], v[:b]
            else:
                cache = (c[ctx.block_tables[i]].reshape(-1, self.n_kv_heads, self.head_dim)
                         [:ctx.seq_lens[i]] for c in (self.k_cache, self.v_cache))
                keys, values = cache
            keys = keys.repeat_interleave(groups, dim=1)
            values = values.repeat_interleave(groups, dim=1)
            if self.softcap is not None or self.window is not None:
                outs.append(self._capped(q[a:b], keys, values))
                continue
            n_q, n_k = b - a, keys.shape[0]
            # query i sees keys up to its own position; chunk_causal: top-left, as if the
            # keys began with the queries (a later chunk, or a step verifying drafts)
            first = 0 if self.bug == "chunk_causal" else n_k - n_q
            mask = torch.arange(n_k)[None] <= torch.arange(first, first + n_q)[:, None]
            out = F.scaled_dot_product_attention(q[a:b].transpose(0, 1), keys.transpose(0, 1),
                                                 values.transpose(0, 1), attn_mask=mask,
                                                 scale=self.scale)
            outs.append(out.transpose(0, 1))
        pad = q.shape[0] - starts[-1]  # a padded batch's rows past its sequences: zeros
        return torch.cat([*outs, q.new_zeros(pad, *q.shape[1:])])

    def _capped(self, q: Tensor, keys: Tensor, values: Tensor) -> Tensor:
        """Gemma 2's attention: soft-capped scores, causal, and the sliding window."""
        scores = torch.einsum("qhd,khd->hqk", q.float(), keys.float()) * self.scale
        if self.softcap is not None:
            scores = torch.tanh(scores / self.softcap) * self.softcap
        n_q, n_k = q.shape[0], keys.shape[0]
        query_pos = torch.arange(n_k - n_q, n_k)[:, None]
        key_pos = torch.arange(n_k)[None]
        hidden = key_pos > query_pos
        if self.window is not None:
            hidden |= key_pos <= query_pos - self.window
        probs = torch.softmax(scores.masked_fill(hidden, float("-inf")), -1)
        return torch.einsum("hqk,khd->qhd", probs, values.float()).to(q.dtype)


class SelfAttention(nn.Module):
    def __init__(self, cfg: Any, qk_norm: bool, bug: str | None, layer: int = 0) -> None:
        super().__init__()
        self.n_heads, self.n_kv_heads = cfg.num_attention_heads, cfg.num_key_value_heads
        self.head_dim = cfg.head_dim
        self.q_size, self.kv_size = self.n_heads * self.head_dim, self.n_kv_heads * self.head_dim
        self.qkv_proj = nn.Linear(cfg.hidden_size, self.q_size + 2 * self.kv_size,
                                  bias=cfg.attention_bias)
        self.o_proj = nn.Linear(self.q_size, cfg.hidden_size, bias=False)
        self.q_norm = RMSNorm(self.head_dim, cfg.rms_norm_eps) if qk_norm else None
        self.k_norm = RMSNorm(self.head_dim, cfg.rms_norm_eps) if qk_norm else None
        self.rotary_emb = RotaryEmbedding(self.head_dim, cfg.rope_theta, bug)
        scalar = getattr(cfg, "query_pre_attn_scalar", None)
        types = getattr(cfg, "layer_types", None)
        sliding = bool(types) and types[layer] == "sliding_attention"
        self.attn = Attention(self.n_heads, self.n_kv_heads, self.head_dim, bug,
                              scale=scalar ** -0.5 if scalar else None,
                              softcap=getattr(cfg, "attn_logit_softcapping", None),
                              window=cfg.sliding_window if sliding else None)

    def forward(self, positions: Tensor, x: Tensor) -> Tensor:
        q, k, v = self.qkv_proj(x).split([self.q_size, self.kv_size, self.kv_size], -1)
        q = q.view(-1, self.n_heads, self.head_dim)
        k = k.view(-1, self.n_kv_heads, self.head_dim)
        v = v.view(-1, self.n_kv_heads, self.head_dim)
        if self.q_norm is not None and self.k_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = self.rotary_emb(positions, q, k)
        return self.o_proj(self.attn(q, k, v).flatten(1, -1))


class SiluAndMul(nn.Module):
    def forward(self, x: Tensor) -> Tensor:
        gate, up = x.chunk(2, -1)
        return F.silu(gate) * up


class GeluAndMul(nn.Module):
    def forward(self, x: Tensor) -> Tensor:
        gate, up = x.chunk(2, -1)
        return F.gelu(gate, approximate="tanh") * up


class MLP(nn.Module):
    def __init__(self, cfg: Any) -> None:
        super().__init__()
        self.gate_up_proj = nn.Linear(cfg.hidden_size, 2 * cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)
        self.act_fn = GeluAndMul() if cfg.gemma else SiluAndMul()

    def forward(self, x: Tensor) -> Tensor:
        return self.down_proj(self.act_fn(self.gate_up_proj(x)))


class ReplicatedLinear(nn.Module):
    """vLLM's: returns ``(output, bias)``; a MoE block's router is one."""

    def __init__(self, n_in: int, n_out: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(n_out, n_in))

    def forward(self, x: Tensor) -> tuple[Tensor, None]:
        return F.linear(x, self.weight), None


class FusedMoE(nn.Module):
    """vLLM's fused experts: every expert's gate and up rows in ``w13_weight`` [E, 2I, H],
    its down projection in ``w2_weight`` [E, H, I]; called with the router's logits, it
    routes (softmax, top-k, renormalized where the config says) and runs the experts in one
    module, with no module per expert."""

    def __init__(self, cfg: Any, bug: str | None) -> None:
        super().__init__()
        e, i, h = cfg.num_experts, cfg.moe_intermediate_size, cfg.hidden_size
        self.w13_weight = nn.Parameter(torch.empty(e, 2 * i, h))
        self.w2_weight = nn.Parameter(torch.empty(e, h, i))
        self.top_k = cfg.num_experts_per_tok
        self.renormalize = bool(getattr(cfg, "norm_topk_prob", False)) and \
            bug != "moe_no_renormalize"

    def forward(self, hidden_states: Tensor, router_logits: Tensor) -> Tensor:
        weights = torch.softmax(router_logits.float(), -1)
        top, chosen = torch.topk(weights, self.top_k, -1)
        if self.renormalize:
            top = top / top.sum(-1, keepdim=True)
        out = torch.zeros_like(hidden_states)
        for expert in range(self.w13_weight.shape[0]):
            rows, slot = torch.where(chosen == expert)
            if rows.numel():
                x = hidden_states[rows]
                gate, up = F.linear(x, self.w13_weight[expert]).chunk(2, -1)
                y = F.linear(F.silu(gate) * up, self.w2_weight[expert])
                out.index_add_(0, rows, y * top[rows, slot, None].to(y.dtype))
        return out


class SparseMoeBlock(nn.Module):
    """vLLM's Qwen3-MoE block: ``router_logits, _ = self.gate(x)``, then the experts."""

    def __init__(self, cfg: Any, bug: str | None) -> None:
        super().__init__()
        self.gate = ReplicatedLinear(cfg.hidden_size, cfg.num_experts)
        self.experts = FusedMoE(cfg, bug)

    def forward(self, x: Tensor) -> Tensor:
        router_logits, _ = self.gate(x)
        return self.experts(hidden_states=x, router_logits=router_logits)


class DecoderLayer(nn.Module):
    def __init__(self, cfg: Any, qk_norm: bool, bug: str | None, layer: int = 0) -> None:
        super().__init__()
        gemma = cfg.gemma
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, gemma)
        self.self_attn = SelfAttention(cfg, qk_norm, bug, layer)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, gemma)
        if gemma:
            self.pre_feedforward_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, True)
            self.post_feedforward_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, True)
        sparse = cfg.num_experts and layer not in (getattr(cfg, "mlp_only_layers", None) or ()) \
            and (layer + 1) % (getattr(cfg, "decoder_sparse_step", 1) or 1) == 0
        self.mlp: nn.Module = SparseMoeBlock(cfg, bug) if sparse else MLP(cfg)
        self.skipped = bug == "skip_layer" and layer == 1  # runs, and its result is dropped

    def forward(self, positions: Tensor, hidden: Tensor,
                residual: Tensor | None) -> tuple[Tensor, Tensor]:
        if self.skipped and residual is not None:
            self._forward(positions, hidden.clone(), residual.clone())
            return hidden, residual
        return self._forward(positions, hidden, residual)

    def _forward(self, positions: Tensor, hidden: Tensor,
                 residual: Tensor | None) -> tuple[Tensor, Tensor]:
        if residual is None:
            residual = hidden
            hidden = self.input_layernorm(hidden)
        else:
            hidden, residual = self.input_layernorm(hidden, residual)
        hidden = self.self_attn(positions, hidden)
        if hasattr(self, "pre_feedforward_layernorm"):  # Gemma 2: the sandwich norms
            hidden = self.post_attention_layernorm(hidden)
            hidden, residual = self.pre_feedforward_layernorm(hidden, residual)
            return self.post_feedforward_layernorm(self.mlp(hidden)), residual
        hidden, residual = self.post_attention_layernorm(hidden, residual)
        return self.mlp(hidden), residual


class Model(nn.Module):
    def __init__(self, cfg: Any, qk_norm: bool, bug: str | None) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_padded, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg, qk_norm, bug, i)
                                    for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, cfg.gemma)
        self.normalizer = cfg.hidden_size ** 0.5 if cfg.gemma else None

    def forward(self, input_ids: Tensor, positions: Tensor) -> Tensor:
        hidden, residual = self.embed_tokens(input_ids), None
        if self.normalizer is not None:  # Gemma: sqrt(hidden), in the activations' dtype
            hidden = hidden * torch.tensor(self.normalizer, dtype=hidden.dtype)
        for layer in self.layers:
            hidden, residual = layer(positions, hidden, residual)
        hidden, _ = self.norm(hidden, residual)
        return hidden


def _last_rows(x: Tensor) -> Tensor:
    """The rows the logits are computed for: each sequence's last token (a batch), the last
    position (a prefill), every row (a decode step, or a speculative verify step)."""
    if _CONTEXT.logits_rows is not None:
        return x[_CONTEXT.logits_rows]
    return x[-1:] if _CONTEXT.is_prefill else x


class LMHead(nn.Module):
    """At prefill, only each sequence's last position is turned into logits."""

    def __init__(self, cfg: Any) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(cfg.vocab_padded, cfg.hidden_size))

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(_last_rows(x), self.weight)


@dataclass
class LogitsProcessorOutput:
    """SGLang's: the logits of each sequence's next token, in a dataclass."""

    next_token_logits: Tensor


class LogitsProcessor(nn.Module):
    """SGLang's way to the logits: the lm_head is passed in and its weight used directly (the
    lm_head module itself never runs), and the result is a dataclass."""

    def forward(self, hidden: Tensor, lm_head: LMHead) -> LogitsProcessorOutput:
        hidden = _last_rows(hidden)
        return LogitsProcessorOutput(F.linear(hidden, lm_head.weight))


class ForCausalLM(nn.Module):
    """``forward`` gives hidden states; ``compute_logits`` is a call of its own (through the
    lm_head, as vLLM, or with ``sglang_logits`` through a ``LogitsProcessor``, as SGLang)."""

    packed: ClassVar[dict[str, tuple[str, int]]] = {
        "q_proj": ("qkv_proj", 0), "k_proj": ("qkv_proj", 1), "v_proj": ("qkv_proj", 2),
        "gate_proj": ("gate_up_proj", 0), "up_proj": ("gate_up_proj", 1)}

    def __init__(self, cfg: Any, qk_norm: bool, bug: str | None) -> None:
        super().__init__()
        self.model = Model(cfg, qk_norm, bug)
        self.lm_head = LMHead(cfg)
        self.logits_processor = LogitsProcessor()
        self.sglang_logits = False
        self.final_softcap = getattr(cfg, "final_logit_softcapping", None)
        self.vocab_size = cfg.vocab_size  # the logits' width, without the padding rows

    def forward(self, input_ids: Tensor, positions: Tensor) -> Tensor:
        return self.model(input_ids, positions)

    def compute_logits(self, hidden: Tensor) -> Tensor:
        if self.sglang_logits:
            logits = self.logits_processor(hidden, self.lm_head).next_token_logits
        else:
            logits = self.lm_head(hidden)
        logits = logits[..., :self.vocab_size]
        if self.final_softcap is not None:  # Gemma 2, after the lm_head (as vLLM's processor)
            logits = torch.tanh(logits / self.final_softcap) * self.final_softcap
        return logits


class Sampler(nn.Module):
    """Greedy at temperature 0, else a draw from softmax(logits / temperature)."""

    def __init__(self, bug: str | None) -> None:
        super().__init__()
        self.bug = bug
        self.generator = torch.Generator().manual_seed(1)

    def forward(self, logits: Tensor, temperature: float) -> Tensor:
        if temperature == 0 and self.bug != "greedy_temperature":
            return logits.argmax(-1)
        probs = torch.softmax(logits.float() / max(temperature, 1.0), -1)
        return torch.multinomial(probs, 1, generator=self.generator)[:, 0]


def _config(directory: Path) -> Any:
    raw = json.loads((directory / "config.json").read_text())
    cfg = type("Config", (), {})()
    for key, value in raw.items():
        setattr(cfg, key, value)
    cfg.head_dim = raw.get("head_dim") or raw["hidden_size"] // raw["num_attention_heads"]
    cfg.attention_bias = raw.get("attention_bias", False)
    cfg.num_experts = raw.get("num_experts") or raw.get("num_local_experts") or 0
    cfg.gemma = raw["architectures"][0].startswith("Gemma2")
    cfg.rope_theta = raw.get("rope_theta") or (raw.get("rope_parameters") or {}).get(
        "rope_theta", 10000.0)
    return cfg


_EXPERT = re.compile(r"model\.layers\.(\d+)\.mlp\.experts\.(\d+)\.(gate|up|down)_proj\.weight")


def _load(model: ForCausalLM, directory: Path, tied: bool, bug: str | None) -> None:
    """transformers' tensors into the fused parameters, as vLLM's loader packs them."""
    params = dict(model.named_parameters())
    weights = load_file(str(directory / "model.safetensors"))
    if tied and "lm_head.weight" not in weights:
        weights["lm_head.weight"] = weights["model.embed_tokens.weight"]
    with torch.no_grad():
        for name, tensor in weights.items():
            if bug == "layer_not_loaded" and name.startswith("model.layers.1."):
                continue  # the loader skips a layer: its random init stays
            expert = _EXPERT.fullmatch(name)
            if expert is not None:  # each expert's tensor into its slot of w13 or w2
                layer, e, proj = expert.groups()
                moe = f"model.layers.{layer}.mlp.experts."
                rows = tensor.shape[0]
                if proj == "down":
                    params[moe + "w2_weight"][int(e)] = tensor
                else:
                    start = 0 if proj == "gate" else rows
                    params[moe + "w13_weight"][int(e), start:start + rows] = tensor
                continue
            for part, (fused, index) in ForCausalLM.packed.items():
                if f".{part}." in name:
                    if bug == "swapped_kv_rows" and fused == "qkv_proj" and index:
                        index = 3 - index
                    target = params[name.replace(part, fused)]
                    sizes = _part_sizes(model, fused)
                    start = sum(sizes[:index])
                    target[start:start + sizes[index]] = tensor
                    break
            else:
                target = params[name]
                target[:tensor.shape[0]] = tensor
                target[tensor.shape[0]:] = 0  # padded vocabulary rows, as vLLM's loader


def _part_sizes(model: ForCausalLM, fused: str) -> list[int]:
    attn = model.model.layers[0].self_attn
    if fused == "qkv_proj":
        return [attn.q_size, attn.kv_size, attn.kv_size]
    half = model.model.layers[0].mlp.down_proj.in_features
    return [half, half]


@dataclass
class Sequence_:
    token_ids: list[int]
    block_table: list[int] = field(default_factory=list)


class LLM:
    """The engine: a model runner with a paged KV cache, prefill then decode, one sequence."""

    def __init__(self, directory: str | Path, *, bug: str | None = None,
                 dtype: torch.dtype = torch.float32, num_blocks: int = 64,
                 logits: str = "vllm", vocab_multiple: int = 1,
                 prefill_chunk: int | None = None, prefix_cache: bool = False,
                 speculative: int = 0, cuda_graph: bool = False,
                 preempt: int | None = None) -> None:
        if bug is not None and bug not in BUGS:
            raise ValueError(f"unknown bug {bug!r}")
        directory = Path(directory)
        cfg = _config(directory)
        cfg.vocab_padded = -(-cfg.vocab_size // vocab_multiple) * vocab_multiple
        self.bug, self.prefill_chunk = bug, prefill_chunk
        self.prefix_cache, self.quiet = prefix_cache, False
        self.speculative = speculative  # draft tokens per decode step (0: none)
        self.proposer: Any = None  # (tokens, k) -> drafts, in place of the n-gram proposer
        self.cached_blocks: dict[tuple[int, ...], int] = {}  # a prompt prefix -> its block
        arch = cfg.architectures[0]
        torch.manual_seed(1234)  # the random init a skipped layer keeps
        self.model = ForCausalLM(cfg, qk_norm=arch.startswith("Qwen3"), bug=bug)
        for p in self.model.parameters():
            nn.init.normal_(p, std=0.2)
        _load(self.model, directory, bool(getattr(cfg, "tie_word_embeddings", False)), bug)
        if logits not in ("vllm", "sglang"):
            raise ValueError(f"logits={logits!r}: vllm or sglang")
        self.model.sglang_logits = logits == "sglang"
        self.model.to(dtype).eval()
        self.sampler = Sampler(bug)
        shape = (num_blocks, BLOCK_SIZE, cfg.num_key_value_heads, cfg.head_dim)
        for layer in self.model.model.layers:
            layer.self_attn.attn.k_cache = torch.zeros(shape, dtype=dtype)
            layer.self_attn.attn.v_cache = torch.zeros(shape, dtype=dtype)
        self.free_blocks = list(range(num_blocks - 1))[::-1]
        self.null_slot = (num_blocks - 1) * BLOCK_SIZE  # a block never handed out: padding
        self.cuda_graph = cuda_graph
        self.preempt = preempt  # the batch step a decoding sequence is preempted at
        self.on_logits: Any = None  # called with each step's last-position logits
        self.meta = {"engine": "nano-vllm-test", "architecture": arch,
                     "n_heads": cfg.num_attention_heads, "n_kv_heads": cfg.num_key_value_heads,
                     "head_dim": cfg.head_dim, "vocab_size": cfg.vocab_size,
                     "kv_block_size": BLOCK_SIZE}

    def _slot(self, seq: Sequence_, position: int) -> int:
        while len(seq.block_table) * BLOCK_SIZE <= position:
            seq.block_table.append(self.free_blocks.pop())
        return seq.block_table[position // BLOCK_SIZE] * BLOCK_SIZE + position % BLOCK_SIZE

    def _run(self, seq: Sequence_, ids: list[int], positions: list[int], slots: list[int],
             prefill: bool, temperature: float, last: bool = True,
             context_len: int | None = None) -> int:
        global _CONTEXT
        _CONTEXT = Context(prefill, torch.tensor(slots), torch.tensor(seq.block_table),
                           context_len or len(seq.token_ids))
        input_ids, pos = torch.tensor(ids), torch.tensor(positions)
        if not self.quiet:
            lockstep.probe("input_ids", input_ids)  # what users probe: the step's inputs
            lockstep.probe("positions", pos)
        with torch.no_grad():
            if self.bug == "swapped_args":
                hidden = self.model(pos, input_ids)
            else:
                hidden = self.model(input_ids, pos)
            logits = self.model.compute_logits(hidden)
            if self.on_logits is not None and last:  # a prefill's last chunk, or decode
                self.on_logits(0, logits[-1])
            return [int(t) for t in self.sampler(logits, temperature)]

    def generate(self, prompt: Sequence[int], decode: int, *,
                 forced: Sequence[int] | None = None, temperature: float = 0.0) -> list[int]:
        """Prefill, then ``decode`` steps; each step's chosen token (the next one fed is
        ``forced[i]`` when given: the reference's tokens)."""
        seq = Sequence_(list(prompt))
        n = len(prompt)
        # vLLM's prefix caching: full blocks of a prompt served before are reused, and the
        # prefill computes the tokens after them (the last token at least)
        cached = self._cached_prefix(seq, prompt) if self.prefix_cache else 0
        try:
            slots = [self._slot(seq, i) for i in range(n)]
            step = self.prefill_chunk or n  # vLLM's chunked prefill: one forward per chunk
            for a in range(cached, n, step):
                b = min(n, a + step)
                first = 0 if self.bug == "chunk_positions" else a  # positions from 0 again
                token = self._run(seq, list(prompt[a:b]), list(range(first, first + b - a)),
                                  slots[a:b], True, temperature, last=b == n, context_len=b)[-1]
            chosen = [token]
            while len(chosen) <= decode:
                i = len(chosen) - 1
                fed = forced[i] if forced is not None and i < len(forced) else chosen[-1]
                # speculative decoding: the token and drafts verified in one forward
                drafts = self.propose(seq.token_ids + [fed], min(self.speculative,
                                                                 decode - i - 1))
                start = len(seq.token_ids)
                seq.token_ids.extend([fed, *drafts])
                positions = list(range(start, len(seq.token_ids)))
                slots = [self._slot(seq, p) for p in positions]
                if self.bug == "decode_position":
                    positions[0] += 1
                if self.bug == "kv_slot":
                    slots[0] += 1
                rows = self._run(seq, [fed, *drafts], positions, slots, False, temperature)
                kept = 0  # drafts kept: each the token the row before it chose (or forced)
                while kept < len(drafts):
                    j = i + 1 + kept
                    want = forced[j] if forced is not None and j < len(forced) else rows[kept]
                    if drafts[kept] != want:
                        break
                    kept += 1
                del seq.token_ids[start + 1 + kept:]  # the rejected drafts leave the sequence
                chosen.extend(rows[:kept + 1])
        finally:  # the sequence is finished: its blocks go back, as vLLM's scheduler frees them
            if self.prefix_cache:  # but the prompt's full blocks stay, cached
                for i in range(n // BLOCK_SIZE):
                    self.cached_blocks.setdefault(tuple(prompt[:(i + 1) * BLOCK_SIZE]),
                                                  seq.block_table[i])
            kept = set(self.cached_blocks.values())
            self.free_blocks.extend(b for b in reversed(seq.block_table) if b not in kept)
        return chosen

    def generate_batch(self, prompts: Sequence[Sequence[int]], decode: int, *,
                       forced: Sequence[Sequence[int] | None] | None = None,
                       join_at: Sequence[int] | None = None) -> list[list[int]]:
        """Every prompt, prefill then ``decode`` steps, as one flat batch per step (vLLM
        v1's scheduler: the running sequences first, then those joining at that step);
        returns each sequence's chosen tokens."""
        global _CONTEXT
        count = len(prompts)
        joins = list(join_at or [0] * count)
        seqs = [Sequence_(list(p)) for p in prompts]
        fed = [0] * count  # prompt tokens computed so far
        chosen: list[list[int]] = [[] for _ in prompts]
        order: list[int] = []  # the sequences running, in the batch's order
        preempted: set[int] = set()  # sequences whose blocks were taken back
        step = 0
        try:
            while any(len(c) <= decode for c in chosen):
                waiting = [i for i in range(count) if i not in order]
                if waiting and not [i for i in order if len(chosen[i]) <= decode]:
                    step = max(step, min(joins[i] for i in waiting))  # idle: move them up
                order += [i for i in waiting if joins[i] <= step]
                if step == self.preempt:  # out of cache blocks: the last decoding sequence
                    victim = [i for i in order if fed[i] == len(prompts[i]) and chosen[i]
                              and len(chosen[i]) <= decode][-1:]  # gives its blocks back
                    for i in victim:
                        kept = set(self.cached_blocks.values())
                        self.free_blocks.extend(b for b in reversed(seqs[i].block_table)
                                                if b not in kept)
                        seqs[i].block_table = []
                        preempted.add(i)
                ids, positions, slots, starts, lens, rows = [], [], [], [0], [], []
                drafted: list[list[int]] = []  # per row, the drafts it fed after its token
                for i in (i for i in order if len(chosen[i]) <= decode):
                    seq, n = seqs[i], len(prompts[i])
                    if i in preempted and step == self.preempt:
                        continue  # waiting for blocks; recomputed at the next step
                    if not seq.block_table and self.prefix_cache and i not in preempted:
                        # first scheduled: the blocks of its prompt cached before
                        fed[i] = self._cached_prefix(seq, prompts[i])
                    drafts: list[int] = []
                    if fed[i] < n:  # (a chunk of) its prompt
                        a = fed[i]
                        fed[i] = min(n, a + (self.prefill_chunk or n))
                        toks, pos = list(prompts[i][a:fed[i]]), list(range(a, fed[i]))
                    else:  # a decode token: the reference's (teacher forcing) or its own
                        k = len(chosen[i]) - 1
                        force = forced[i] if forced is not None else None
                        toks = [force[k] if force is not None and k < len(force)
                                else chosen[i][-1]]
                        if self.speculative and i not in preempted:  # verified in one go
                            drafts = self.propose(seq.token_ids + toks, min(
                                self.speculative, decode - len(chosen[i])))
                            toks += drafts
                        seq.token_ids.extend(toks)
                        pos = list(range(len(seq.token_ids) - len(toks), len(seq.token_ids)))
                        if i in preempted:  # vLLM's recompute: every token again, a prefill
                            preempted.discard(i)  # (after the prompt's blocks still cached)
                            a = self._cached_prefix(seq, prompts[i]) if self.prefix_cache \
                                else 0
                            toks = list(seq.token_ids[a:])
                            pos = list(range(a, len(seq.token_ids)))
                    ids += toks
                    slots += [self._slot(seq, p) + (self.bug == "kv_slot" and p >= n)
                              for p in pos]
                    positions += [p + (self.bug == "decode_position" and p >= n) for p in pos]
                    starts.append(len(ids))
                    lens.append(pos[-1] + 1)  # (its cached tokens after this step)
                    rows.append(i)
                    drafted.append(drafts)
                ends = starts[1:] if self.bug != "batch_last_index" else \
                    [a + 1 for a in starts[:-1]]
                # the rows sampled: each sequence's last token, or every token of one that
                # verifies drafts (vLLM's logits_indices)
                sampled = [list(range(a, e)) if d else [e - 1]
                           for a, e, d in zip(starts, ends, drafted)]
                if self.cuda_graph and len(ids) == len(rows) and \
                        all(seqs[i].token_ids[-1] == ids[j] and len(seqs[i].token_ids) >
                            len(prompts[i]) for j, i in enumerate(rows)):
                    # a decode-only batch runs a captured graph: padded to its size with
                    # token 0 at position 0, written to the null slot
                    size = next((c for c in (1, 2, 4) if c >= len(ids)), None) or \
                        -(-len(ids) // 8) * 8
                    pad = size - len(ids)  # vLLM's capture sizes: 1, 2, 4, then 8, 16, ...
                    ids, positions = ids + [0] * pad, positions + [0] * pad
                    slots += [self.null_slot] * pad
                _CONTEXT = Context(
                    is_prefill=False, slot_mapping=torch.tensor(slots),
                    query_start_loc=starts, seq_lens=lens,
                    block_tables=[torch.tensor(seqs[i].block_table) for i in rows],
                    logits_rows=torch.tensor([r for rs in sampled for r in rs]))
                input_ids, pos_t = torch.tensor(ids), torch.tensor(positions)
                lockstep.probe("input_ids", input_ids)
                lockstep.probe("positions", pos_t)
                with torch.no_grad():
                    logits = self.model.compute_logits(self.model(input_ids, pos_t))
                    tokens = [int(t) for t in self.sampler(logits, 0.0)]
                at = 0  # the sampled row each sequence's start at
                for j, i in enumerate(rows):
                    first, at = at, at + len(sampled[j])
                    if fed[i] == len(prompts[i]):  # a prompt's last chunk, or a decode step
                        drafts, kept = drafted[j], 0  # kept: each the token chosen before
                        force = forced[i] if forced is not None else None
                        while kept < len(drafts):
                            k = len(chosen[i]) + kept
                            want = force[k] if force is not None and k < len(force) else \
                                tokens[first + kept]
                            if drafts[kept] != want:
                                break
                            kept += 1
                        if len(drafts) > kept:  # the rejected drafts leave the sequence
                            del seqs[i].token_ids[len(seqs[i].token_ids) - len(drafts) + kept:]
                        if self.on_logits is not None:
                            self.on_logits(i, logits[first])
                        chosen[i].extend(tokens[first:first + kept + 1])
                    if self.prefix_cache:  # its prompt's full blocks, cached once computed
                        for b in range(min(fed[i], len(prompts[i]) - 1) // BLOCK_SIZE):
                            self.cached_blocks.setdefault(
                                tuple(prompts[i][:(b + 1) * BLOCK_SIZE]), seqs[i].block_table[b])
                step += 1
        finally:
            kept = set(self.cached_blocks.values())
            for seq in seqs:
                self.free_blocks.extend(b for b in reversed(seq.block_table) if b not in kept)
        return chosen

    def _cached_prefix(self, seq: Sequence_, prompt: Sequence[int]) -> int:
        """vLLM's prefix caching: the prompt's full blocks that are cached go into its block
        table; the tokens they hold (the last token is always computed)."""
        cached = 0
        while cached + BLOCK_SIZE < len(prompt) and \
                tuple(prompt[:cached + BLOCK_SIZE]) in self.cached_blocks:
            seq.block_table.append(self.cached_blocks[tuple(prompt[:cached + BLOCK_SIZE])])
            cached += BLOCK_SIZE
        return cached

    def propose(self, tokens: Sequence[int], k: int) -> list[int]:
        """Up to ``k`` draft tokens (vLLM's n-gram proposer): the tokens that followed the
        latest earlier occurrence of the last 3, 2 or 1 tokens."""
        if k <= 0:
            return []
        if self.proposer is not None:
            return list(self.proposer(tokens, k))[:k]
        for n in (3, 2, 1):
            tail = list(tokens[-n:])
            for at in range(len(tokens) - n - 1, -1, -1):
                if list(tokens[at:at + n]) == tail:
                    return list(tokens[at + n:at + n + k])
        return []

    def serve_quietly(self, prompt: Sequence[int]) -> None:
        """Serve ``prompt`` once with no probes: what fills the prefix cache before a run
        that is recorded."""
        self.quiet = True
        try:
            self.generate(prompt, 0)
        finally:
            self.quiet = False


#: the engine's ``py:`` spec, as a user would write it (with ``model=DIR`` as an option)
SPEC = f"py:{Path(__file__).resolve()}:NanoEngine"


class NanoEngine(Engine):
    """The engine as a ``py:`` engine: ``py:tests/engines/nano_vllm.py:NanoEngine`` with the
    options ``model=DIR`` (a transformers model directory) and ``bug=NAME``. It implements
    what a user's engine implements: ``decode_logits`` (for ``bench``, ``generate``,
    ``fuzz``), ``generate`` (for ``diff``) and ``torch_module``; it has no tokenizer (give
    token ids) and no ``step_times`` of its own. ``logits=sglang``: the logits come from an
    SGLang-style ``LogitsProcessor`` returning a dataclass."""

    name = "nano-vllm-test"
    batch_packed = True

    def __init__(self, spec: str, *, model: str, bug: str | None = None,
                 dtype: str = "float32", num_blocks: int = 256, logits: str = "vllm",
                 vocab_multiple: int = 1, prefill_chunk: int = 0,
                 prefix_cache: int = 0, speculative: int = 0, cuda_graph: int = 0,
                 preempt: int = -1, proposer: str = "ngram") -> None:
        super().__init__(spec)
        if proposer not in ("ngram", "forced"):
            raise lockstep.UsageError(f"{spec}: proposer={proposer}: ngram or forced")
        self.proposer = proposer
        self.speculative, self.cuda_graph = int(speculative), bool(int(cuda_graph))
        self.preempt = int(preempt) if int(preempt) >= 0 else None
        self.prefill_chunk = int(prefill_chunk) or None
        self.prefix_cache = bool(int(prefix_cache))
        self.directory, self.bug, self.num_blocks = Path(model), bug, int(num_blocks)
        self.dtype, self.logits = getattr(torch, dtype), logits
        self.vocab_multiple = int(vocab_multiple)

    def load(self) -> None:
        self.llm = LLM(self.directory, bug=self.bug, dtype=self.dtype,
                       num_blocks=self.num_blocks, logits=self.logits,
                       vocab_multiple=self.vocab_multiple, prefill_chunk=self.prefill_chunk,
                       prefix_cache=self.prefix_cache, speculative=self.speculative,
                       cuda_graph=self.cuda_graph, preempt=self.preempt)

    def tokenize(self, text: str) -> list[int]:
        raise lockstep.UsageError(f"{self.spec}: the test engine has no tokenizer: give "
                                  "token ids")

    def torch_module(self) -> Any:
        return self.llm.model

    def max_positions(self) -> int | None:
        return self.num_blocks * BLOCK_SIZE

    def decode_logits(self, prompt_ids: Sequence[int], steps: int, *,
                      forced: Sequence[int] | None = None) -> tuple[list[int], Any]:
        if not prompt_ids or steps < 1:
            raise lockstep.UsageError(f"{self.spec}: a prompt of tokens and a step at least")
        rows: list[Tensor] = []
        self.llm.on_logits = lambda _, last: rows.append(last.float().clone())
        speculative, self.llm.speculative = self.llm.speculative, 0  # one row per step
        try:
            chosen = self.llm.generate(list(prompt_ids), steps - 1, forced=forced)
        finally:
            self.llm.on_logits = None
            self.llm.speculative = speculative
        return chosen, torch.stack(rows).numpy()

    def generate(self, rec: Any, prompt_ids: Sequence[int], decode: int, *,
                 forced: Sequence[int] | None = None) -> list[int]:
        if self.prefix_cache:  # the prompt was served before: its full blocks are cached
            self.llm.serve_quietly(list(prompt_ids))
        rec.watch(self.llm.model)
        return self.llm.generate(list(prompt_ids), decode, forced=forced)

    def generate_batch(self, rec: Any, prompts: Sequence[Sequence[int]], decode: int, *,
                       forced: Sequence[Sequence[int] | None] | None = None,
                       padding: str = "left", join_at: Sequence[int] | None = None
                       ) -> list[list[int]]:
        # vLLM packs: no padding, and no batch metadata (lockstep finds whose token is whose)
        rec.watch(self.llm.model)
        if self.proposer == "forced" and forced is not None:
            self.llm.proposer = _forced_proposer(prompts, forced)
        try:
            return self.llm.generate_batch(prompts, decode, forced=forced, join_at=join_at)
        finally:
            self.llm.proposer = None

    def decode_logits_batch(self, prompts: Sequence[Sequence[int]], steps: int, *,
                            forced: Sequence[Sequence[int] | None] | None = None,
                            padding: str = "left", join_at: Sequence[int] | None = None
                            ) -> list[tuple[list[int], Any]]:
        rows: list[list[Tensor]] = [[] for _ in prompts]
        self.llm.on_logits = lambda i, last: rows[i].append(last.float().clone())
        speculative, self.llm.speculative = self.llm.speculative, 0  # one row per step
        try:
            chosen = self.llm.generate_batch(prompts, steps - 1, forced=forced,
                                             join_at=join_at)
        finally:
            self.llm.on_logits = None
            self.llm.speculative = speculative
        return [(c, torch.stack(r).numpy()) for c, r in zip(chosen, rows)]

    def meta(self) -> dict[str, Any]:
        return {**super().meta(), **self.llm.meta}


def _forced_proposer(prompts: Sequence[Sequence[int]],
                     forced: Sequence[Sequence[int] | None]) -> Any:
    """A proposer that knows the tokens each sequence will be fed (the reference's): its
    first draft is the next of them, kept; the others are that token plus 1, 2, ...,
    rejected. Every verify step keeps one draft and rejects the rest."""
    streams = [list(p) + list(f or ()) for p, f in zip(prompts, forced)]

    def propose(tokens: Sequence[int], k: int) -> list[int]:
        for stream in streams:
            if list(stream[:len(tokens)]) == list(tokens) and len(stream) > len(tokens):
                nxt = stream[len(tokens)]
                return [nxt] + [nxt - d if nxt >= d else nxt + d for d in range(1, k)]
        return []
    return propose
