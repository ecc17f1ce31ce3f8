"""The zoo's boundary bugs: wrong only at some input lengths, so a single-prompt test passes
and ``lockstep fuzz`` has to find the input. They stay out of ``lockstep zoo``'s table (its
fixed 9-token prompt never shows them); each names the smallest input that shows it.

The model each is meant for is ``boundary_model`` (``BoundaryBug.context``): a 2-layer random
Llama with a context of 512 positions, so every length the fuzz tries there is short, or the
same model with a context of ``LONG_CONTEXT`` positions for the one bug that needs a position
past 32767.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = ["BOUNDARY_BUGS", "BoundaryBug", "BLOCK_SIZE", "CONTEXT", "LONG_CONTEXT",
           "ROPE_CACHE_POSITIONS", "boundary_model"]

_ISSUE = "lockstep issue 21 (boundary inputs)"

#: the KV block (page) size the block-boundary bug runs with
BLOCK_SIZE = 16
#: the positions the short RoPE cache is built for (the model takes ``CONTEXT``)
ROPE_CACHE_POSITIONS = 256
#: the boundary model's context (max_position_embeddings)
CONTEXT = 512
#: the long boundary model's context: past 32768, the first position an int16 cannot hold,
#: by 256, so that the fuzz's inputs at the context limit (33023, 33024 tokens) are not the
#: ones around the power of two (32767, 32768, 32769) and decode steps fit past the wrap
LONG_CONTEXT = 32768 + 256


@dataclass(frozen=True)
class BoundaryBug:
    """One boundary bug and the smallest input that shows it."""

    name: str  #: the value of ``bug=``
    description: str
    source: str  #: the public thread or seed whose mechanism it reproduces
    prompt_length: int  #: the smallest failing input's prompt length
    steps: int  #: and its greedy steps (1: the prefill alone)
    crash: bool = False  #: the engine raises instead of computing wrong logits
    context: int = CONTEXT  #: the context of the boundary model it is meant for


_ALL = (
    BoundaryBug(
        "kv_block_off_by_one",
        f"With KV blocks of {BLOCK_SIZE}, the slot a new token's K/V is written to takes its "
        "block from (position - 1) // block_size: position 0 lands in the last block and "
        "the first token of the second block overwrites the first block's slot 0, so nothing "
        f"shows until a sequence reaches length {BLOCK_SIZE + 1} (forces page_size="
        f"{BLOCK_SIZE}).",
        _ISSUE + ": a sequence that crosses a block boundary",
        BLOCK_SIZE + 1, 1),
    BoundaryBug(
        "rope_cache_short",
        f"The RoPE cos/sin cache is built for {ROPE_CACHE_POSITIONS} positions (a default "
        f"max_seq_len) where the model takes {CONTEXT}, and a position past it reads the "
        "cache's last row (a gather that clamps its index).",
        _ISSUE + ": positions beyond the RoPE cache",
        ROPE_CACHE_POSITIONS + 1, 1),
    BoundaryBug(
        "positions_int16",
        "The runner keeps positions in an int16 buffer, so position 32768 wraps to -32768 "
        "and RoPE turns that token by the wrong angle. Meant for the long boundary model "
        f"(context {LONG_CONTEXT}): the smallest failing input is a 32769-token prefill.",
        _ISSUE + ": positions stored in int16 (extreme positions)",
        32769, 1, context=LONG_CONTEXT),
    BoundaryBug(
        "positions_int8",
        "The test double of positions_int16, scaled down: the runner keeps positions in an "
        "int8 buffer, so position 128 wraps to -128. The same bug at a length the "
        "512-position boundary model prefills in milliseconds; positions_int16 is the real "
        "one.",
        _ISSUE + ": positions stored in int16 (extreme positions), scaled down to int8",
        129, 1),
    BoundaryBug(
        "empty_prompt_crash",
        "An empty prompt is not rejected: the prefill runs on no tokens and the engine dies "
        "in its embedding (the bug-free engine refuses it with an error).",
        "seeds/002_8567fc7f63a3946d.txt (an empty sequence, never tested)",
        0, 1, crash=True),
)

#: every boundary bug, by name
BOUNDARY_BUGS: dict[str, BoundaryBug] = {bug.name: bug for bug in _ALL}


def boundary_model(directory: Path, context: int = CONTEXT) -> Path:
    """A 2-layer random Llama (vocab 320) with a context of ``context`` positions (``CONTEXT``
    or ``LONG_CONTEXT``), saved once as a transformers model directory. The weights do not
    depend on the context: the long model is the short one with more positions."""
    config_file = directory / "config.json"
    if config_file.is_file():
        from ..jsontext import loads

        made = loads(config_file.read_text()).get("max_position_embeddings")
        if made != context:
            raise ValueError(f"{directory} holds a boundary model with a context of {made}, "
                             f"not {context}")
        return directory
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config: dict[str, Any] = dict(
        vocab_size=320, hidden_size=128, intermediate_size=176, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=context,
        rope_theta=500000.0, tie_word_embeddings=True, bos_token_id=1, eos_token_id=2,
        pad_token_id=319)  # the pad row is zero (transformers' padding_idx): not token 0
    LlamaForCausalLM(LlamaConfig(**config)).save_pretrained(directory)
    return directory
