"""Choosing the next token from the logits: greedy at temperature 0, else a seeded draw."""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["sample"]


def sample(logits: Tensor, temperature: float, generator: torch.Generator | None = None, *,
           bug: str | None = None) -> Tensor:
    """The next token id, as a one-element int64 tensor.

    ``logits`` is (vocab,). Temperature 0 is greedy (argmax); above 0 the token is drawn from
    ``softmax(logits / temperature)`` with ``generator``.
    """
    if temperature > 0 or bug == "bad_temperature":
        # the bug (ggml#37) scales before the greedy check: at temperature 0 every positive
        # logit becomes +inf, and argmax picks the first of them
        logits = logits / temperature
    if temperature == 0:
        return logits.argmax(-1, keepdim=True)
    probs = torch.softmax(logits.float(), dim=-1)
    return torch.multinomial(probs, 1, generator=generator)
