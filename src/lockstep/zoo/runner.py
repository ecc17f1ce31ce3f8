"""The zoo's model runner: prefill, then one decode step per token, over a paged KV cache."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable
from typing import Sequence as Seq

import torch
from torch import Tensor

from .kv_cache import AttentionMetadata, PagedKVCache, Sequence
from .model import Transformer
from .sampling import sample

__all__ = ["Runner", "Generation", "Batch"]

#: the boundary bugs that keep positions in a narrow integer buffer
_POSITION_DTYPES = {"positions_int16": torch.int16, "positions_int8": torch.int8}


@dataclass
class Batch:
    """One forward's inputs: the new tokens, their positions, the attention metadata."""

    input_ids: Tensor  #: (1, new)
    positions: Tensor  #: (1, new)
    meta: AttentionMetadata


@dataclass
class Generation:
    """What a run produced."""

    tokens: list[int]  #: the token chosen at each step (prefill, then each decode step)
    logits: list[Tensor]  #: the float32 last-position logits of each step, (vocab,)


class Runner:
    """Runs one sequence through a zoo model: a prefill, then ``decode`` decode steps.

    ``on_forward`` is called with the token ids each forward feeds the embedding, just before
    the forward (the engine records them as ``input_ids``).
    """

    def __init__(self, model: Transformer, *, page_size: int = 4, temperature: float = 0.0,
                 seed: int = 0, vm: bool = False,
                 on_forward: Callable[[Tensor], None] | None = None) -> None:
        self.model = model
        self.bug = model.bug
        self.page_size = page_size
        self.temperature = temperature
        self.vm = vm
        self.on_forward = on_forward
        self.device = model.tok_embeddings.weight.device
        self.generator = torch.Generator(self.device).manual_seed(seed)
        # the sampler's output buffer, reused every step (a CUDA-graph engine's static output)
        self._next_token = torch.zeros(1, dtype=torch.long, device=self.device)

    @torch.no_grad()
    def run(self, prompt_ids: Seq[int], decode: int,
            forced: Seq[int] | None = None) -> Generation:
        """Prefill ``prompt_ids`` and decode ``decode`` tokens; ``forced`` teacher-forces the
        token fed at each decode step (the chosen ones are still reported)."""
        args = self.model.args
        # the pages the run needs, the null page, and one spare that a write one slot past
        # the last page (wrong_kv_slot) lands in
        pages = -(-(len(prompt_ids) + decode) // self.page_size) + 2
        cache = PagedKVCache(n_layers=args.n_layers, num_pages=pages,
                             page_size=self.page_size, n_kv_heads=args.n_kv_heads,
                             head_dim=args.head_dim, dtype=self.model.output.weight.dtype,
                             device=self.device)
        seq = Sequence(prompt_ids, cache)
        chosen: list[int] = []
        rows: list[Tensor] = []
        for step in range(decode + 1):
            batch = self._decode_batch(seq) if step else self._prefill_batch(seq)
            logits = self._forward(batch)[0, -1]
            rows.append(logits.float())
            chosen.append(self._pick(logits))
            if step < decode:
                fed = forced[step] if forced is not None and step < len(forced) else chosen[-1]
                seq.token_ids.append(fed)
        return Generation([int(t) for t in chosen], rows)

    def _prefill_batch(self, seq: Sequence) -> Batch:
        seq.reserve()
        slots = seq.slots(self.device)
        meta = AttentionMetadata(seq.cache, slot_mapping=self._write_slots(seq, 0, slots),
                                 context_slots=slots, is_decode=False)
        return Batch(torch.tensor([seq.token_ids], device=self.device),
                     torch.arange(len(seq), device=self.device)[None], meta)

    def _decode_batch(self, seq: Sequence) -> Batch:
        seq.reserve()
        n = len(seq)
        # the token to feed is the sequence's last; its position is its index
        token = seq.token_ids[-2] if self.bug == "wrong_decode_token" else seq.token_ids[-1]
        position = n if self.bug == "wrong_decode_position" else n - 1
        # its slot: the last page, at the page's fill count minus one
        fill = seq.last_page_fill()
        offset = fill if self.bug == "wrong_kv_slot" else fill - 1
        slot = torch.tensor([seq.pages[-1] * self.page_size + offset], device=self.device)
        context = 0 if self.bug == "decode_attn_zeros" else n  # tokens attention reads
        meta = AttentionMetadata(seq.cache, slot_mapping=self._write_slots(seq, n - 1, slot),
                                 context_slots=seq.slots(self.device)[:context], is_decode=True,
                                 vm=self.vm)
        return Batch(torch.tensor([[token]], device=self.device),
                     torch.tensor([[position]], device=self.device), meta)

    def _write_slots(self, seq: Sequence, first: int, slots: Tensor) -> Tensor:
        """Where the K/V of the sequence's tokens from ``first`` on are written: ``slots``,
        but for the block-boundary bug."""
        if self.bug != "kv_block_off_by_one":
            return slots
        size = self.page_size  # the bug: a token's block taken as (position - 1) // size
        return torch.tensor([seq.pages[(i - 1) // size] * size + i % size
                             for i in range(first, len(seq))], device=self.device)

    def _forward(self, batch: Batch) -> Tensor:
        """The logits of one forward, (1, new, vocab)."""
        wraps = _POSITION_DTYPES.get(self.bug or "")
        if wraps is not None:  # the positions' buffer wraps: past 32767 (int16), 127 (int8)
            batch.positions = batch.positions.to(wraps).long()
        if self.bug == "swapped_args":  # model(positions, input_ids): the arguments swapped
            return self._call(batch.positions, batch.input_ids, batch.meta)
        return self._call(batch.input_ids, batch.positions, batch.meta)

    def _call(self, tokens: Tensor, positions: Tensor, meta: AttentionMetadata) -> Tensor:
        if self.on_forward is not None:
            self.on_forward(tokens)
        return self.model(tokens, positions, meta).logits

    def _pick(self, logits: Tensor) -> int:
        """Sample the next token into the reused buffer and return it."""
        self._next_token.copy_(sample(logits, self.temperature, self.generator, bug=self.bug))
        if self.bug == "token_as_tensor":
            # a view into the buffer, not an int: it turns into every later step's token
            return self._next_token[0]  # type: ignore[return-value]
        return int(self._next_token[0])
