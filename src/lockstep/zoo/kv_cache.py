"""A paged KV cache: fixed-size pages of slots, a block table per sequence, a slot mapping
per forward.

A token's K and V live in one slot, ``page * page_size + offset``; a sequence's block table
lists its pages in order, so its i-th token is in slot
``pages[i // page_size] * page_size + i % page_size``. Each forward says where the new tokens'
K/V go (``slot_mapping``) and which slots hold the whole sequence (``context_slots``), as
vLLM's attention metadata does.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

import torch
from torch import Tensor

__all__ = ["PagedKVCache", "Sequence", "AttentionMetadata"]


class PagedKVCache:
    """K and V of every layer in ``num_pages`` pages of ``page_size`` slots; page 0 is never
    handed out (vLLM keeps block 0 as its null block)."""

    def __init__(self, *, n_layers: int, num_pages: int, page_size: int, n_kv_heads: int,
                 head_dim: int, dtype: torch.dtype, device: torch.device | str) -> None:
        shape = (n_layers, num_pages * page_size, n_kv_heads, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.page_size = page_size
        self._free = list(range(num_pages - 1, 0, -1))  # popped from the end: 1, 2, 3, ...

    def allocate(self) -> int:
        """A free page."""
        if not self._free:
            raise RuntimeError("the zoo's KV cache is out of pages")
        return self._free.pop()

    def write(self, layer: int, slots: Tensor, k: Tensor, v: Tensor) -> None:
        """Store the new tokens' K/V, shaped (batch, tokens, kv_heads, head_dim), in ``slots``
        (batch * tokens of them, in that order)."""
        self.k[layer, slots.reshape(-1)] = k.reshape(-1, *k.shape[2:])
        self.v[layer, slots.reshape(-1)] = v.reshape(-1, *v.shape[2:])

    def read(self, layer: int, slots: Tensor) -> tuple[Tensor, Tensor]:
        """K and V of ``slots``, in order: (*slots.shape, kv_heads, head_dim) each."""
        return self.k[layer, slots], self.v[layer, slots]


class Sequence:
    """One sequence's token ids and block table."""

    def __init__(self, token_ids: Iterable[int], cache: PagedKVCache) -> None:
        self.token_ids: list[int] = list(token_ids)  #: the prompt, then each fed token
        self.pages: list[int] = []  #: the block table
        self.cache = cache

    def __len__(self) -> int:
        return len(self.token_ids)

    def reserve(self) -> None:
        """Make the block table long enough for every token of the sequence."""
        while len(self.pages) * self.cache.page_size < len(self):
            self.pages.append(self.cache.allocate())

    def slot(self, index: int) -> int:
        """The slot of the ``index``-th token."""
        size = self.cache.page_size
        return self.pages[index // size] * size + index % size

    def slots(self, device: torch.device | str) -> Tensor:
        """The slots of all the sequence's tokens, in order."""
        return torch.tensor([self.slot(i) for i in range(len(self))], device=device)

    def last_page_fill(self) -> int:
        """How many tokens the last page of the block table holds."""
        return len(self) - (len(self.pages) - 1) * self.cache.page_size


@dataclass
class AttentionMetadata:
    """What the attention layers need to know about one forward besides the hidden states."""

    cache: PagedKVCache
    slot_mapping: Tensor  #: (new tokens,) where each new token's K/V is written
    context_slots: Tensor  #: (context,) the slots of the whole sequence, in order
    is_decode: bool  #: one new token after a prefill
    vm: bool = False  #: run decode's QKV, QK-norm and RoPE in the blocked VM
    #: a padded batch (batch_runner): ``context_slots`` is (batch, context) and this
    #: (batch, new, context) says which keys each new token may see; None: one sequence
    visible: Tensor | None = None
