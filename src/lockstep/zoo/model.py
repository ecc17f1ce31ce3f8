"""The zoo's Llama/Qwen3 transformer, its modules named as Meta's Llama reference code names
them.

``named_modules()`` gives: ``tok_embeddings``, ``layers.{i}`` (a block; its output is the
layer output), ``layers.{i}.attention_norm``, ``layers.{i}.attention`` with ``wq``, ``wk``,
``wv``, ``q_norm`` and ``k_norm`` (Qwen3), ``rope`` and ``wo``, ``layers.{i}.ffn_norm``,
``layers.{i}.feed_forward`` with ``w1`` (gate), ``w3`` (up) and ``w2`` (down), ``norm`` and
``output`` (the logits).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .attention import Attention
from .config import ModelArgs
from .family_layers import embedding, feed_forward, final_softcap
from .kv_cache import AttentionMetadata
from .layers import LMHead, RMSNorm

__all__ = ["Transformer", "TransformerBlock", "Step"]


class Step:
    """What one forward returns. Neither a bare tensor nor a dataclass (whose fields a
    recorder records), so a recorder watching the model keeps the logits once, as the
    ``output`` module's output."""

    __slots__ = ("logits",)

    def __init__(self, logits: Tensor) -> None:
        self.logits = logits  #: (batch, seq, vocab)


class TransformerBlock(nn.Module):
    """Pre-norm attention and MLP, each added to the residual stream."""

    def __init__(self, layer_id: int, args: ModelArgs) -> None:
        super().__init__()
        offset = args.extra.norm_offset
        self.attention_norm = RMSNorm(args.dim, args.norm_eps, args.bug, offset)
        self.attention = Attention(layer_id, args)
        self.ffn_norm = RMSNorm(args.dim, args.norm_eps, args.bug, offset)
        self.feed_forward = feed_forward(args)
        if args.extra.sandwich_norms:  # Gemma 2: the attention and MLP outputs normed too
            self.post_attention_norm = RMSNorm(args.dim, args.norm_eps, args.bug, offset)
            self.post_ffn_norm = RMSNorm(args.dim, args.norm_eps, args.bug, offset)

    def forward(self, x: Tensor, positions: Tensor, meta: AttentionMetadata) -> Tensor:
        attn = self.attention(self.attention_norm(x), positions, meta)
        if hasattr(self, "post_attention_norm"):
            attn = self.post_attention_norm(attn)
        h = x + attn
        mlp = self.feed_forward(self.ffn_norm(h))
        if hasattr(self, "post_ffn_norm"):
            mlp = self.post_ffn_norm(mlp)
        return h + mlp


class Transformer(nn.Module):
    """Embedding, ``n_layers`` blocks, the final norm and the lm_head."""

    def __init__(self, args: ModelArgs) -> None:
        super().__init__()
        self.args = args
        self.bug = args.bug
        self.tok_embeddings = embedding(args)
        self.layers = nn.ModuleList(TransformerBlock(i, args) for i in range(args.n_layers))
        self.norm = RMSNorm(args.dim, args.norm_eps, args.bug, args.extra.norm_offset)
        self.output = LMHead(args.dim, args.vocab_size, args.bug)
        if args.tie_embeddings:
            self.output.weight = self.tok_embeddings.weight
        self.last_hidden = torch.empty(0)  # the last hidden state prefill leaves for decode

    def fuse_qkv(self) -> None:
        """Build every layer's fused QKV weight for the decode VM."""
        for module in self.modules():
            if isinstance(module, Attention):
                module.fuse_qkv()

    def forward(self, tokens: Tensor, positions: Tensor, meta: AttentionMetadata) -> Step:
        """Logits of every new token; ``tokens`` and ``positions`` are (batch, seq)."""
        h = self.tok_embeddings(tokens)
        for layer in self.layers:
            h = layer(h, positions, meta)
        if not meta.is_decode:
            self.last_hidden = h[:, -1:]
        elif self.bug == "stale_hidden":
            h = self.last_hidden  # the bug: decode reads what prefill left, not its own state
        return Step(final_softcap(self.args, self.output(self.norm(h))))

