"""Loader bugs of the families: a bias the loader skips or drops, an lm_head left untied."""

from __future__ import annotations

import re

import torch
from torch import nn

from .model import Transformer

__all__ = ["skipped", "after_load"]


def skipped(bug: str | None, name: str) -> bool:
    """Whether the loader skips the zoo parameter ``name`` (it keeps its random init)."""
    # vllm#40160: the k part of the fused qkv bias is never written
    return bug == "k_bias_not_loaded" and bool(re.fullmatch(r"layers\.\d+\.attention\.wk\.bias",
                                                            name))


def after_load(model: Transformer) -> None:
    """What a buggy loader does once the checkpoint is in."""
    with torch.no_grad():
        if model.bug == "qkv_bias_dropped":
            # candle-vllm#167, ANEForge#253: attention_bias read as false, the biases unused
            for name, param in model.named_parameters():
                if re.fullmatch(r"layers\.\d+\.attention\.w[qkv]\.bias", name):
                    param.zero_()
        elif model.bug == "lm_head_untied":
            # parallax#444: tie_word_embeddings forced off, a fresh lm_head that no checkpoint
            # tensor fills stays zero
            model.output.weight = nn.Parameter(torch.zeros_like(model.output.weight))
