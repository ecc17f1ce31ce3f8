"""The zoo's batch runner: several sequences in one padded forward per step, over one paged
KV cache, with requests that may join while the others decode (continuous batching).

Each step's rows are the sequences running at that step; a row holds its new tokens (the
prompt at its first step, then one token) padded to the step's width on the left or the
right. Padding tokens get position 0 and KV slot 0 (the null page). Every row reads its
sequence's earlier tokens, then the step's columns; ``AttentionMetadata.visible`` lets each
real token see the real keys before it and nothing else.

The batch bugs (``batch_bugs``) live here, behind ``if self.bug == "name"`` checks.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, cast
from typing import Sequence as Seq

import torch
from torch import Tensor

from .kv_cache import AttentionMetadata, PagedKVCache, Sequence
from .model import Transformer
from .runner import Runner
from .sampling import sample

__all__ = ["BatchRunner", "Request", "BatchGeneration", "PADDING"]

PADDING = ("left", "right")
_NULL_SLOT = 0  #: where padding tokens' K/V go: page 0 is never handed out
_PAD_TOKEN = 0


@dataclass
class Request:
    """One sequence of the batch: its prompt, the batch step it joins at, its forced tokens."""

    prompt: list[int]
    join_at: int = 0
    forced: list[int] | None = None


@dataclass
class BatchGeneration:
    """What a batch run produced, per sequence, and the layout of every step."""

    tokens: list[list[int]]  #: per sequence, the token chosen at each of its steps
    logits: list[list[Tensor]]  #: per sequence, its float32 last-position logits per step
    steps: list[dict[str, Any]] = field(default_factory=list)  #: see ``BatchRunner.run_batch``
    #: the forward each sequence joined at (its arrival, or the next forward when the batch
    #: was idle until then)
    joined: list[int] = field(default_factory=list)


class _OwnPages:
    """An allocator handing out pages 1, 2, ... to one sequence alone (the bug
    ``batch_shared_kv``: every sequence counts from page 1 of the same cache)."""

    def __init__(self, page_size: int) -> None:
        self.page_size = page_size
        self._next = 1

    def allocate(self) -> int:
        self._next += 1
        return self._next - 1


class BatchRunner(Runner):
    """Runs requests through a zoo model as one batch: ``decode`` decode steps each after its
    prefill, teacher-forced when the request has forced tokens."""

    def __init__(self, model: Transformer, *, page_size: int = 4, padding: str = "left",
                 temperature: float = 0.0, seed: int = 0,
                 on_forward: Callable[[Tensor], None] | None = None) -> None:
        if padding not in PADDING:
            raise ValueError(f"padding {padding!r}: left or right")
        super().__init__(model, page_size=page_size, temperature=temperature, seed=seed,
                         on_forward=on_forward)
        self.padding = padding

    @torch.no_grad()
    def run_batch(self, requests: Seq[Request], decode: int) -> BatchGeneration:
        """Every request's prefill and ``decode`` decode steps. ``steps`` holds, per batch
        step, ``rows`` (the sequence of each row), ``width``, and per row ``start`` and
        ``length`` (its real columns), ``write`` and ``read`` (the KV slots its real tokens
        were written to and its attention read)."""
        args = self.model.args
        longest = max(len(r.prompt) for r in requests) + decode
        pages = len(requests) * (-(-longest // self.page_size)) + 2
        cache = PagedKVCache(n_layers=args.n_layers, num_pages=pages, page_size=self.page_size,
                             n_kv_heads=args.n_kv_heads, head_dim=args.head_dim,
                             dtype=self.model.output.weight.dtype, device=self.device)
        # (under the bug, a sequence's pages come from an allocator of its own: Sequence
        # only calls allocate() and reads page_size)
        seqs = [Sequence(r.prompt, cast(PagedKVCache, _OwnPages(self.page_size))
                         if self.bug == "batch_shared_kv" else cache) for r in requests]
        done = [0] * len(requests)  # forwards each sequence has run
        out = BatchGeneration([[] for _ in requests], [[] for _ in requests],
                              joined=[0] * len(requests))
        step = 0  # the scheduler's clock; an idle batch skips to the next request's arrival
        while any(d <= decode for d in done):
            rows = [i for i, r in enumerate(requests) if r.join_at <= step and done[i] <= decode]
            if not rows:
                step = min(r.join_at for i, r in enumerate(requests) if done[i] == 0)
                continue
            for i in rows:
                if done[i] == 0:
                    out.joined[i] = len(out.steps)
            out.steps.append(self._step(cache, requests, seqs, rows, done, out))
            for i in rows:
                done[i] += 1
                if done[i] <= decode:
                    forced = requests[i].forced
                    k = done[i] - 1
                    fed = forced[k] if forced is not None and k < len(forced) \
                        else out.tokens[i][-1]
                    seqs[i].token_ids.append(fed)
            step += 1
        return out

    def _step(self, cache: PagedKVCache, requests: Seq[Request], seqs: list[Sequence],
              rows: list[int], done: list[int], out: BatchGeneration) -> dict[str, Any]:
        """One padded forward over ``rows``; picks each row's token; returns the layout."""
        new = [len(seqs[i]) if done[i] == 0 else 1 for i in rows]
        before = [len(seqs[i]) - n for i, n in zip(rows, new)]
        width = max(new)
        for i in rows:
            seqs[i].reserve()
        starts = [width - n if self.padding == "left" else 0 for n in new]
        tokens = torch.full((len(rows), width), _PAD_TOKEN, dtype=torch.long)
        positions = torch.zeros((len(rows), width), dtype=torch.long)
        slots = torch.full((len(rows), width), _NULL_SLOT, dtype=torch.long)
        write: list[list[int]] = []
        for b, i in enumerate(rows):
            cols = slice(starts[b], starts[b] + new[b])
            index = list(range(before[b], before[b] + new[b]))
            tokens[b, cols] = torch.tensor(seqs[i].token_ids[before[b]:])
            if self.bug == "batch_positions_no_offset":  # the column, not the token's index
                positions[b] = torch.arange(before[b], before[b] + width)
            else:
                positions[b, cols] = torch.tensor(index)
            write.append([seqs[i].slot(t) for t in index])
            slots[b, cols] = torch.tensor(write[-1])
        # context: padding to the longest history, the history, then the step's columns
        history = max(before)
        context = history + width
        ctx_slots = torch.full((len(rows), context), _NULL_SLOT, dtype=torch.long)
        valid = torch.zeros((len(rows), context), dtype=torch.bool)
        read: list[list[int]] = []
        for b, i in enumerate(rows):
            table = self._table(seqs, i, requests)
            past = [self._read_slot(table, seqs[i], t) for t in range(before[b])]
            own = [self._read_slot(table, seqs[i], t) for t in range(before[b],
                                                                   before[b] + new[b])]
            read.append(past + own)
            lo = history - before[b]
            ctx_slots[b, lo:history] = torch.tensor(past, dtype=torch.long)
            valid[b, lo:history] = True
            ctx_slots[b, history:] = slots[b]
            ctx_slots[b, history + starts[b]:history + starts[b] + new[b]] = torch.tensor(own)
            valid[b, history + starts[b]:history + starts[b] + new[b]] = True
        causal = torch.ones(width, context, dtype=torch.bool).tril(history)
        visible = causal[None].expand(len(rows), -1, -1)
        if self.bug != "batch_no_pad_mask":
            visible = visible & valid[:, None, :]
        meta = AttentionMetadata(cache, slot_mapping=slots.to(self.device),
                                 context_slots=ctx_slots.to(self.device),
                                 is_decode=all(d > 0 for d in (done[i] for i in rows)),
                                 visible=visible.to(self.device))
        tokens, positions = tokens.to(self.device), positions.to(self.device)
        if self.on_forward is not None:
            self.on_forward(tokens)
        logits = self.model(tokens, positions, meta).logits  # (rows, width, vocab)
        last = [starts[b] + new[b] - 1 for b in range(len(rows))]
        for b, i in enumerate(rows):
            # the bug: each row's token is taken from the next row's last column
            src = (b + 1) % len(rows) if self.bug == "batch_logits_wrong_row" else b
            row = logits[src, last[src]]
            out.logits[i].append(row.float())
            out.tokens[i].append(int(sample(row, self.temperature, self.generator)[0]))
        return {"rows": rows, "width": width, "start": starts, "length": new,
                "write": write, "read": read}

    def _table(self, seqs: list[Sequence], i: int, requests: Seq[Request]) -> Sequence:
        """The block table row ``i`` reads through: its own, except under the bug
        ``batch_join_stale_table``, where a request that joined late reads row 0's."""
        if self.bug == "batch_join_stale_table" and requests[i].join_at > 0 and i != 0:
            return seqs[0]
        return seqs[i]

    @staticmethod
    def _read_slot(table: Sequence, own: Sequence, index: int) -> int:
        """The slot the ``index``-th token is read from: through ``table`` where its block
        table reaches that far."""
        reach = len(table.pages) * table.cache.page_size
        return table.slot(index) if table is own or index < reach else own.slot(index)
