"""Tiny real transformers models built from a config (random weights, no download)."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import torch

import lockstep
from lockstep.engines.hf import forward_step

PROMPT = [3, 17, 42, 7, 99, 5, 64]


def tiny(family: str, seed: int = 0) -> Any:
    """A 2-layer model of the family, sizes chosen so no two dims coincide."""
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen3Config, Qwen3ForCausalLM

    torch.manual_seed(seed)
    common = dict(vocab_size=160, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    if family == "llama":
        model = LlamaForCausalLM(LlamaConfig(**common))
    elif family == "qwen3":
        model = Qwen3ForCausalLM(Qwen3Config(head_dim=16, **common))
    else:
        raise ValueError(family)
    return model.eval()


def save_tiny(family: str, directory: Path) -> Path:
    """A 2-layer random transformers model saved as a real model directory."""
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen3Config, Qwen3ForCausalLM

    torch.manual_seed(0)
    config: dict[str, Any] = dict(
        vocab_size=320, hidden_size=128, intermediate_size=176, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    model: Any
    if family == "llama":  # tied lm_head, Llama 3's rope_theta
        config.update(rope_theta=500000.0, tie_word_embeddings=True)
        model = LlamaForCausalLM(LlamaConfig(**config))
    else:  # head_dim 64: a head is four 16-element VM blocks
        config.update(rope_theta=1000000.0, head_dim=64)
        model = Qwen3ForCausalLM(Qwen3Config(**config))
    model.save_pretrained(directory)
    return directory


def save_good_and_bad(root: Path) -> Path:
    """``root``/good: tiny("llama") saved; ``root``/bad: the same with layer 1's down_proj
    weight times 1.5 (a bug that changes the scale from model.layers.1.mlp.down_proj on)."""
    model = tiny("llama")
    model.save_pretrained(root / "good")
    with torch.no_grad():
        model.model.layers[1].mlp.down_proj.weight.mul_(1.5)
    model.save_pretrained(root / "bad")
    return root


def variant(model: Any, dtype: torch.dtype | None = None) -> Any:
    out = copy.deepcopy(model)
    return out.to(dtype) if dtype is not None else out


def greedy(model: Any, path: Any, *, decode: int = 3, position_shift: int = 0,
           forced: list[int] | None = None) -> list[int]:
    """Record prefill + ``decode`` steps of greedy decoding with a KV cache.

    ``position_shift`` adds to the position of every decode token (a decode-only bug).
    """
    chosen = []
    with lockstep.record(path, meta={"engine": "test"}) as rec, torch.no_grad():
        rec.watch(model)
        ids = torch.tensor([PROMPT])
        out, cache = forward_step(model, ids, None)
        for step in range(1, decode + 1):
            token = int(out.logits[0, -1].float().argmax())
            chosen.append(token)
            fed = forced[step - 1] if forced else token
            pos = torch.tensor([[len(PROMPT) + step - 1 + position_shift]])
            out, cache = forward_step(model, torch.tensor([[fed]]), cache, position_ids=pos)
    return chosen
