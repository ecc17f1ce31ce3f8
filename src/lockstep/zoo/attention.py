"""Grouped-query attention over the paged KV cache, with optional QK-norm (Qwen3)."""

from __future__ import annotations

import functools

import torch
from torch import Tensor, nn

from .config import ModelArgs
from .kv_cache import AttentionMetadata
from .layers import RMSNorm, Rope
from .lora import LoRALinear
from .scores import ScoreRules
from .vm import blocked_qkv

__all__ = ["Attention", "SCORE_ELEMENTS"]

#: the most attention scores (batch x heads x queries x keys) one block of query rows
#: computes at once: 64 MB of float32, where a whole 33k-token prefill would take 17 GB
SCORE_ELEMENTS = 1 << 24


@functools.lru_cache(maxsize=4)
def _hidden(rows: int, device: torch.device) -> Tensor:
    """(rows, rows) True above the diagonal: the keys of a block's own queries that a causal
    mask hides from each of them (one mask for every block of a prefill)."""
    return torch.ones(rows, rows, dtype=torch.bool, device=device).triu(1)


class Attention(nn.Module):
    """Q, K, V projections, QK-norm, RoPE, cache write and read, attention, output projection.

    Shapes: the input and output are (batch, seq, dim); ``q_norm``, ``k_norm`` and ``rope`` see
    (batch, seq, heads, head_dim); ``wo``'s input is the attention output with the heads merged,
    (batch, seq, heads * head_dim).
    """

    wqkv: Tensor | None  #: the decode VM's fused [wq; wk; wv] weight (see fuse_qkv)
    bqkv: Tensor | None  #: its fused bias, for models with attention biases

    def __init__(self, layer_id: int, args: ModelArgs) -> None:
        super().__init__()
        self.layer_id = layer_id
        self.n_heads, self.n_kv_heads = args.n_heads, args.n_kv_heads
        self.head_dim = args.head_dim
        self.bug = args.bug
        q_size, kv_size = args.n_heads * args.head_dim, args.n_kv_heads * args.head_dim
        self.sizes = (q_size, kv_size, kv_size)
        if args.extra.fused:  # Phi-3: one qkv projection, split after it
            self.qkv = LoRALinear(args.dim, q_size + 2 * kv_size, bias=args.attention_bias)
        else:
            self.wq = LoRALinear(args.dim, q_size, bias=args.attention_bias)
            self.wk = LoRALinear(args.dim, kv_size, bias=args.attention_bias)
            self.wv = LoRALinear(args.dim, kv_size, bias=args.attention_bias)
        self.wo = LoRALinear(q_size, args.dim, bias=False)
        offset = args.extra.norm_offset  # Gemma 3's q/k norms scale by (1 + w) too
        self.q_norm = self.k_norm = None
        if args.qk_norm:
            self.q_norm = RMSNorm(args.head_dim, args.norm_eps, args.bug, offset)
            self.k_norm = RMSNorm(args.head_dim, args.norm_eps, args.bug, offset)
        theta = 10000.0 if args.bug == "rope_theta_default" else args.rope_theta
        local = args.extra.local_rope_theta
        if local is not None and layer_id in args.extra.sliding_layers and \
                args.bug != "local_rope_global_theta":
            theta = local  # Gemma 3's sliding layers (vllm#29111: the global base there)
        rotary_dim = None if args.bug == "partial_rotary_full" else args.extra.rotary_dim
        self.rope = Rope(args.head_dim, theta, args.bug, rotary_dim, args.extra.rope_scaling)
        self.scores = ScoreRules(layer_id, args)
        self.register_buffer("wqkv", None, persistent=False)
        self.register_buffer("bqkv", None, persistent=False)

    def fuse_qkv(self) -> None:
        """Concatenate wq, wk and wv (adapters merged) into the VM's one QKV weight."""
        with torch.no_grad():
            parts = (self.qkv,) if hasattr(self, "qkv") else (self.wq, self.wk, self.wv)
            self.wqkv = torch.cat([w.merged_weight() for w in parts])
            if parts[0].bias is not None:
                self.bqkv = torch.cat([w.bias for w in parts])

    def project(self, x: Tensor, positions: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Q and K (normed and rotated) and V of every new token, (batch, seq, heads, head_dim)."""
        batch, seq, _ = x.shape
        if hasattr(self, "qkv"):
            q, k, v = self.qkv(x).split(self.sizes, dim=-1)
        else:
            q, k, v = self.wq(x), self.wk(x), self.wv(x)
        q = q.view(batch, seq, self.n_heads, self.head_dim)
        k = k.view(batch, seq, self.n_kv_heads, self.head_dim)
        v = v.view(batch, seq, self.n_kv_heads, self.head_dim)
        if self.q_norm is not None and self.k_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = self.rope(q, k, positions)
        return q, k, v

    def forward(self, x: Tensor, positions: Tensor, meta: AttentionMetadata) -> Tensor:
        if meta.vm and meta.is_decode:
            q, k, v = blocked_qkv(self, x, positions)
        else:
            q, k, v = self.project(x, positions)
        meta.cache.write(self.layer_id, meta.slot_mapping, k, v)
        keys, values = meta.cache.read(self.layer_id, meta.context_slots)
        if meta.visible is not None:  # a padded batch: each row its own keys and mask
            return self.wo(self.attend_rows(q, keys, values, meta.visible))
        # the mask only matters with several new tokens (a decode token may see every slot)
        if self.bug == "prefill_no_causal_mask":
            causal = meta.cache is None  # TinyLLM#17: masked only when no cache is attached
        else:
            causal = x.shape[1] > 1
        return self.wo(self.attend(q, keys, values, causal, meta.is_decode))

    def attend_rows(self, q: Tensor, keys: Tensor, values: Tensor, visible: Tensor) -> Tensor:
        """``attend`` for a padded batch: ``keys`` and ``values`` are (batch, context,
        kv_heads, head_dim), ``visible`` (batch, new, context); a padding query that sees no
        key gets zeros."""
        batch, new, heads, head_dim = q.shape
        group = heads // self.n_kv_heads
        k = keys.transpose(1, 2).repeat_interleave(group, 1)  # (batch, heads, context, dim)
        v = values.transpose(1, 2).repeat_interleave(group, 1)
        scores = self.scores.cap(q.transpose(1, 2) @ k.transpose(2, 3) * self.scores.scale)
        scores = scores.masked_fill(~visible[:, None], float("-inf"))
        at_least_fp32 = torch.promote_types(scores.dtype, torch.float32)
        probs = torch.softmax(scores, dim=-1, dtype=at_least_fp32).nan_to_num(0.0)
        out = probs.to(q.dtype) @ v  # (batch, heads, new, head_dim)
        return out.transpose(1, 2).reshape(batch, new, heads * head_dim)

    def attend(self, q: Tensor, keys: Tensor, values: Tensor, causal: bool,
               decode: bool = False) -> Tensor:
        """Softmax attention of the new tokens' queries over the sequence's keys and values.

        ``q`` is (batch, new, heads, head_dim), ``keys`` and ``values`` (context, kv_heads,
        head_dim) with the new tokens last; returns (batch, new, heads * head_dim).
        """
        batch, new, heads, head_dim = q.shape
        context = keys.shape[0]
        if context == 0:  # nothing to attend to: the kernel writes nothing into its buffer
            return q.new_zeros(batch, new, heads * head_dim)
        k = keys.transpose(0, 1)[None]  # (1, kv_heads, context, head_dim)
        v = values.transpose(0, 1)[None]
        group = heads // self.n_kv_heads
        if self.bug == "gqa_tiled_kv":
            k, v = k.repeat(1, group, 1, 1), v.repeat(1, group, 1, 1)  # kv heads 0, 1, 0, 1
        else:
            k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)  # 0, 0, 1, 1
        rows = max(1, SCORE_ELEMENTS // (batch * heads * context))
        q = q.transpose(1, 2)  # (batch, heads, new, head_dim)
        if rows >= new:
            out = self._attend_rows(q, k, v, 0, new, causal, decode)
        else:  # a long prefill: a block of query rows at a time, each row's softmax the same
            out = torch.cat([self._attend_rows(q, k, v, start, min(start + rows, new), causal,
                                               decode) for start in range(0, new, rows)], 2)
        if self.bug == "heads_no_transpose":
            return out.reshape(batch, new, heads * head_dim)  # mixes tokens into one row
        return out.transpose(1, 2).reshape(batch, new, heads * head_dim)

    def _attend_rows(self, q: Tensor, k: Tensor, v: Tensor, start: int, stop: int,
                     causal: bool, decode: bool) -> Tensor:
        """The attention output of queries ``start .. stop - 1`` of ``q`` (batch, heads, new,
        head_dim) over ``k`` and ``v`` (1, heads, context, head_dim): (batch, heads,
        stop - start, head_dim). Under a causal mask the keys after the block's last query
        are left out (the last block, and so a whole prefill in one, keeps them all)."""
        new, context = q.shape[2], k.shape[2]
        if (start, stop) == (0, new):  # the whole prefill (or a decode step) at once
            seen = context
            scores = self.scores.cap(q @ k.transpose(2, 3) * self.scores.scale)
            if causal:
                # query i (at context index context - new + i) sees keys 0 .. context - new + i
                visible = torch.ones(new, context, dtype=torch.bool, device=q.device)
                scores = scores.masked_fill(~visible.tril(context - new), float("-inf"))
        else:
            seen = context - new + stop if causal else context  # the keys a query may see
            k, v = k[:, :, :seen], v[:, :, :seen]
            scores = self.scores.cap((q[:, :, start:stop] @ k.transpose(2, 3))
                                     .mul_(self.scores.scale))
            if causal:  # only the block's last stop - start keys are hidden from some rows
                scores[..., seen - (stop - start):].masked_fill_(
                    _hidden(stop - start, q.device), float("-inf"))
        window = self.scores.window(new, context, decode, q.device, (start, stop, seen))
        if window is not None:
            scores = scores.masked_fill(~window, float("-inf"))
        at_least_fp32 = torch.promote_types(scores.dtype, torch.float32)
        probs = torch.softmax(scores, dim=-1, dtype=at_least_fp32).to(q.dtype)
        return probs @ v
