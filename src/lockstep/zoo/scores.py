"""What a layer does to its attention scores besides the dot product: their scale, Gemma 2's
soft cap, and the sliding window's mask (with the bugs each has had)."""

from __future__ import annotations

import torch
from torch import Tensor

from .config import ModelArgs

__all__ = ["ScoreRules"]


class ScoreRules:
    """One layer's score scale, soft cap and window."""

    def __init__(self, layer_id: int, args: ModelArgs) -> None:
        extra, bug = args.extra, args.bug
        self.bug = bug
        self.scale = extra.query_scale or args.head_dim ** -0.5
        if bug == "query_pre_attn_scalar_ignored":
            self.scale = args.head_dim ** -0.5  # llama.cpp#8444: 1/sqrt(head_dim) for all
        self.softcap = None if bug == "attn_softcap_missing" else extra.attn_softcap
        layers = set(extra.sliding_layers)
        if bug == "window_layers_swapped":  # transformers#31775: the odd layers, not the even
            layers = set(range(args.n_layers)) - layers
        elif bug == "window_all_layers":  # vllm#21863: every layer slides
            layers = set(range(args.n_layers))
        self.size = extra.sliding_window if layer_id in layers else None
        if bug == "window_ignored":
            self.size = None  # unsloth#8253: the window never reaches the attention

    def cap(self, scores: Tensor) -> Tensor:
        """Soft-cap the scores: cap * tanh(scores / cap)."""
        if self.softcap is None:
            return scores
        return torch.tanh(scores / self.softcap) * self.softcap

    def window(self, new: int, context: int, decode: bool, device: torch.device,
               rows: tuple[int, int, int] | None = None) -> Tensor | None:
        """(new, context) True where a query may see a key under the window, or None.

        A query sees ``size`` keys, itself included: key j > position - size. ``rows``
        (start, stop, keys) gives the mask of queries start .. stop - 1 over the first
        ``keys`` keys only, (stop - start, keys)."""
        if self.size is None:
            return None
        size = self.size
        if self.bug == "window_off_by_one" or (self.bug == "window_decode_off_by_one"
                                               and decode):
            size += 1  # vllm#3385, mlx-lm#390: one key more than the window holds
        start, stop, seen = rows if rows is not None else (0, new, context)
        positions = torch.arange(context - new + start, context - new + stop,
                                 device=device)[:, None]
        keys = torch.arange(seen, device=device)[None]
        return keys > positions - size
