"""The zoo's batch bugs: wrong only when several sequences share a forward (``batch_runner``).

Each shows under ``lockstep diff --batch`` (the zoo engine runs the prompts as one batch, the
reference runs each alone) and never in a one-prompt run. ``sequence`` is the sequence whose
comparison diverges first, ``pair`` the two sequences its diagnosis names.
"""

from __future__ import annotations

from dataclasses import dataclass

from .bug import Bug

__all__ = ["BatchBug", "BATCH_BUGS", "BATCH_PROMPTS", "JOIN_PROMPT"]

#: the batch scorer's prompts: of different lengths, so the shorter one is padded
BATCH_PROMPTS = ([3, 17, 42, 7, 99, 5, 64, 21, 8], [11, 250, 37, 4])
#: the request that joins while the others decode (continuous batching)
JOIN_PROMPT = [90, 12, 200]


@dataclass(frozen=True)
class BatchBug(Bug):
    """A bug that needs a batch, and the batch it shows in."""

    padding: str = "left"  #: the padding side the run uses
    join_at: int | None = None  #: the batch step JOIN_PROMPT joins at (None: no joiner)
    sequence: int = 1  #: the sequence whose comparison diverges first
    pair: tuple[int, int] = (1, 0)  #: the sequences the diagnosis names


_ISSUE = "issue 21 (batched inference and continuous batching), the bug list"
BATCH_BUGS: dict[str, BatchBug] = {b.name: b for b in (
    BatchBug("batch_no_pad_mask",
             "The attention mask is the causal mask alone: a left-padded row's real tokens "
             "attend to the padding keys before them.",
             _ISSUE, "prefill", 0, "layers.0.attn_heads", "batch_mask"),
    BatchBug("batch_positions_no_offset",
             "Positions are each token's column in the padded batch, not its index in its "
             "sequence, so a left-padded row's tokens are rotated as if the padding were text.",
             _ISSUE,
             "prefill", 0, "layers.0.q_rope", "batch_positions"),
    BatchBug("batch_shared_kv",
             "Every sequence's block table counts pages from 1 on its own instead of taking "
             "them from the cache's one free list, so two sequences write the same KV slots.",
             _ISSUE,
             "prefill", 0, "layers.0.attn_heads", "batch_kv_shared", sequence=0,
             pair=(0, 1)),
    BatchBug("batch_logits_wrong_row",
             "Each sequence's next token is taken from the next row's last token: the "
             "logits of the wrong sequence.",
             _ISSUE,
             "prefill", 0, "logits", "batch_leak", padding="right", sequence=0, pair=(0, 1)),
    BatchBug("batch_join_stale_table",
             "A request that joins while others decode reads its keys and values through "
             "row 0's block table: its own row of the table was never filled in.",
             _ISSUE,
             "prefill", 0, "layers.0.attn_heads", "batch_leak", join_at=2, sequence=2,
             pair=(2, 0)),
)}
