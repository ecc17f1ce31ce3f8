"""The inputs ``lockstep fuzz`` tries, in order, from a seed: the boundary cases first (an
empty prompt, lengths 1 and 2 and around every power of two, the KV block size and the
context limit, decode steps across a block boundary and up to the limit, repeated tokens,
special tokens inside a prompt), then batches mixing very different lengths (both padding
sides, and a request joining mid-decode), then random prompts. Numpy only."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping

import numpy as np

__all__ = ["BatchInput", "FuzzInput", "Space", "boundary_lengths", "generate", "space_of"]

#: the length and decode steps of the first input, whose KL measures the engines' drift
BASELINE = (8, 4)
#: greedy steps of a boundary input: the prefill and one decode step, so that the decode
#: check (decode against the engine's own prefill) runs on it too
STEPS = 2
#: the meta keys an engine may give its KV block size under
BLOCK_KEYS = ("kv_block_size", "block_size", "page_size")
SPECIAL_NAMES = ("bos", "eos", "pad")
#: the padding sides batch inputs use (an engine that pads one side only skips the other)
PADDINGS = ("left", "right")
#: greedy steps of a batch input whose last request joins mid-decode, and the batch step
#: it joins at: the others are still decoding then
JOIN = (4, 2)


def _ids(tokens: tuple[int, ...], shown: int) -> str:
    """``0 0 0 ... 0 5``: the first and last ``shown // 2`` ids of a long prompt."""
    ids = [str(t) for t in tokens]
    if len(ids) > shown:
        ids = ids[: shown // 2] + ["..."] + ids[-(shown // 2):]
    return " ".join(ids)


def _count(n: int, word: str) -> str:
    return f"{n} {word}{'s' * (n != 1)}"


@dataclass(frozen=True)
class FuzzInput:
    """One input: prompt token ids and greedy steps (1: the prefill alone)."""

    tokens: tuple[int, ...]
    steps: int
    why: str = ""  #: what it tests

    @property
    def positions(self) -> int:
        """Positions it fills: the prompt and every token fed after it."""
        return len(self.tokens) + self.steps - 1

    @property
    def key(self) -> tuple[int, int, int, tuple[int, ...]]:
        """The order "smaller" means when shrinking: fewer positions, then fewer decode steps,
        then a shorter prompt, then smaller token ids."""
        return (self.positions, self.steps, len(self.tokens), self.tokens)

    def same(self, other: FuzzInput) -> bool:
        return (self.tokens, self.steps) == (other.tokens, other.steps)

    def describe(self, shown: int = 12) -> str:
        """``17 tokens, 1 step: 0 0 0 ... 0 5``."""
        head = f"{_count(len(self.tokens), 'token')}, {_count(self.steps, 'step')}"
        return f"{head}: {_ids(self.tokens, shown)}" if self.tokens else head

    def to_json(self) -> dict[str, Any]:
        return {"tokens": list(self.tokens), "steps": self.steps, "why": self.why}


@dataclass(frozen=True)
class BatchInput:
    """Several prompts the candidate runs as one batch (the reference runs each alone):
    padded on ``padding``'s side, the last joining at batch step ``join_at`` while the others
    decode (continuous batching; None: every prompt starts together)."""

    sequences: tuple[tuple[int, ...], ...]
    steps: int  #: greedy steps of every sequence (1: the prefill alone)
    padding: str = "left"
    join_at: int | None = None
    why: str = ""

    @property
    def positions(self) -> int:
        """Positions its longest sequence fills (the cap holds for each sequence)."""
        return max(len(s) for s in self.sequences) + self.steps - 1

    @property
    def key(self) -> tuple[int, int, int, tuple[int, ...]]:
        """As ``FuzzInput.key``, over every sequence's positions and tokens together
        (shrinking first drops sequences, then shrinks each one by this)."""
        flat = tuple(t for s in self.sequences for t in s)
        return (len(flat) + len(self.sequences) * (self.steps - 1), self.steps, len(flat), flat)

    def alone(self, i: int) -> FuzzInput:
        """Sequence ``i`` as a single-sequence input."""
        return FuzzInput(self.sequences[i], self.steps, self.why)

    def without(self, i: int) -> BatchInput:
        """The batch less sequence ``i`` (dropping the joining request drops the join)."""
        rest = self.sequences[:i] + self.sequences[i + 1:]
        join = self.join_at if i != len(self.sequences) - 1 else None
        return BatchInput(rest, self.steps, self.padding, join, self.why)

    def replaced(self, i: int, x: FuzzInput) -> BatchInput:
        """Sequence ``i`` replaced by ``x``'s tokens, every sequence taking ``x``'s steps; a
        join moves up so that the others still decode when the request joins (none left to
        join: it is dropped)."""
        seqs = self.sequences[:i] + (x.tokens,) + self.sequences[i + 1:]
        join = self.join_at if self.join_at is None or self.join_at < x.steps else \
            (x.steps - 1 or None)
        return BatchInput(seqs, x.steps, self.padding, join, self.why)

    def same(self, other: BatchInput) -> bool:
        return (self.sequences, self.steps, self.padding, self.join_at) == (
            other.sequences, other.steps, other.padding, other.join_at)

    @property
    def layout(self) -> str:
        """``left padding``, ``right padding, sequence 2 joins at step 2``."""
        join = "" if self.join_at is None else \
            f", sequence {len(self.sequences) - 1} joins at step {self.join_at}"
        return f"{self.padding} padding{join}"

    def describe(self, shown: int = 12) -> str:
        """``batch of 2 (left padding), 1 step: #0 2 tokens: 5 0 | #1 1 token: 7``."""
        seqs = " | ".join(f"#{i} {_count(len(s), 'token')}: {_ids(s, shown)}"
                          for i, s in enumerate(self.sequences))
        return (f"batch of {len(self.sequences)} ({self.layout}), "
                f"{_count(self.steps, 'step')}: {seqs}")

    def to_json(self) -> dict[str, Any]:
        return {"batch": [list(s) for s in self.sequences], "steps": self.steps,
                "padding": self.padding, "join_at": self.join_at, "why": self.why}


@dataclass(frozen=True)
class Space:
    """What the inputs are drawn from, read from the engines."""

    vocab: int  #: token ids are below this
    context: int | None  #: the model's context limit (positions), where known
    block: int | None  #: the candidate's KV block size, where its meta gives one
    max_length: int  #: no input fills more positions than this
    special: Mapping[str, int] = field(default_factory=dict)  #: bos, eos, pad ids

    def to_json(self) -> dict[str, Any]:
        return {"vocab": self.vocab, "context": self.context, "block": self.block,
                "max_length": self.max_length, "special": dict(self.special)}


def _special(engine: Any) -> dict[str, int]:
    """The BOS, EOS and pad ids of an engine's tokenizer or model config, where it has them."""
    found: dict[str, int] = {}
    sources = [getattr(engine, "tokenizer", None),
               getattr(getattr(engine, "model", None), "config", None)]
    for name in SPECIAL_NAMES:
        for source in sources:
            value = getattr(source, f"{name}_token_id", None) if source is not None else None
            if isinstance(value, list):
                value = value[0] if value else None
            if isinstance(value, int) and value >= 0:
                found[name] = value
                break
    return found


def space_of(ref: Any, cand: Any, vocab: int, max_length: int | None) -> Space:
    """The space of two loaded engines: the smaller context of the two, the candidate's KV
    block size; ``max_length`` caps the lengths (default: the context, or 1024 unknown)."""
    limits = [n for n in (ref.max_positions(), cand.max_positions()) if n]
    context = min(limits) if limits else None
    meta = cand.meta()
    block = next((int(meta[k]) for k in BLOCK_KEYS if isinstance(meta.get(k), int)), None)
    cap = max_length or context or 1024
    special = {k: v for k, v in {**_special(cand), **_special(ref)}.items() if v < vocab}
    return Space(vocab, context, block, min(cap, context) if context else cap, special)


def boundary_lengths(space: Space) -> list[int]:
    """Prompt lengths where engines break: 1, 2, every power of two and its neighbours, the
    KV block size and its multiples' neighbours, the context limit; ascending, within the
    space's cap."""
    cap = space.max_length
    found = {1, 2}
    p = 2
    while p <= cap + 1:
        found.update((p - 1, p, p + 1))
        p *= 2
    if space.block:
        for m in (1, 2, 16):
            found.update(m * space.block + d for d in (-1, 0, 1))
    if space.context:
        found.update((space.context - 1, space.context))
    return sorted(n for n in found if (n >= 1 and n + STEPS - 1 <= cap) or n == cap)


def batch_lengths(space: Space) -> list[tuple[int, ...]]:
    """Prompt lengths batched together: 1 with 17 with a long one, the lengths around the
    KV block size, 1 beside one at the cap; each within the cap."""
    cap, block = space.max_length - STEPS + 1, space.block or 16
    long = min(cap, max(129, 8 * block + 1))
    mixes = [(1, min(cap, 17), long), tuple(min(cap, block + d) for d in (-1, 0, 1)),
             (1, cap)]
    return [m for m in mixes if cap >= 2]


def _batches(space: Space, tokens: Any) -> list[BatchInput]:
    """The batch inputs: each mix of lengths with left and right padding, then a request
    joining mid-decode (padded either side)."""
    out = [BatchInput(tuple(tokens(n) for n in lengths), STEPS, side,
                      why=f"lengths {', '.join(map(str, lengths))} in one batch")
           for lengths in batch_lengths(space) for side in PADDINGS]
    steps, join = JOIN
    if space.max_length >= 9 + steps - 1:
        for side in PADDINGS:
            out.append(BatchInput((tokens(9), tokens(4), tokens(3)), steps, side, join,
                                  why=f"a request joining at step {join}"))
    return out


def generate(space: Space, budget: int, seed: int) -> list[FuzzInput | BatchInput]:
    """``budget`` inputs, the same for the same space and seed: the baseline, the boundary
    cases, the batches, then random prompts."""
    rng = np.random.default_rng(seed)
    cap = space.max_length

    def tokens(n: int) -> tuple[int, ...]:
        return tuple(int(t) for t in rng.integers(0, space.vocab, n))

    def fits(n: int, steps: int) -> bool:
        return n + steps - 1 <= cap

    out: list[FuzzInput | BatchInput] = []
    length, steps = BASELINE
    out.append(FuzzInput(tokens(min(length, cap)), min(steps, cap), "baseline"))
    out.append(FuzzInput((), 1, "empty prompt"))
    for n in boundary_lengths(space):
        steps = STEPS if fits(n, STEPS) else 1
        out.append(FuzzInput(tokens(n), steps, f"length {n}"))
    if space.block:  # decode steps across the first block boundaries
        for n in (space.block - 1, 2 * space.block - 1):
            if n >= 1 and fits(n, 4):
                out.append(FuzzInput(tokens(n), 4, f"decode across block boundary {n + 1}"))
    if space.context and space.context <= cap:  # decode up to the context limit
        for k in (2, 4):
            out.append(FuzzInput(tokens(space.context - k + 1), k,
                                 f"decode to the context limit ({k - 1} steps)"))
    lengths = [n for n in boundary_lengths(space) if n >= 3 and fits(n, STEPS)]
    for _ in range(4):  # repeated tokens
        n = int(rng.choice(lengths)) if lengths else 1
        out.append(FuzzInput((int(rng.integers(space.vocab)),) * n, STEPS if fits(n, STEPS)
                             else 1, f"one token repeated {n} times"))
    for name, token in sorted(space.special.items()):  # special tokens inside a prompt
        for _ in range(2):
            n = int(rng.choice(lengths)) if lengths else 1
            ids = list(tokens(n))
            for at in rng.choice(n, size=max(1, n // 8), replace=False):
                ids[int(at)] = token
            out.append(FuzzInput(tuple(ids), STEPS if fits(n, STEPS) else 1,
                                 f"{name} ({token}) inside a prompt of {n}"))
    out.extend(_batches(space, tokens))
    while len(out) < budget:  # random lengths, log-uniform, and random steps
        n = int(np.exp(rng.uniform(0, np.log(cap))))
        steps = int(rng.integers(1, 9))
        n = max(1, min(n, cap - steps + 1))
        out.append(FuzzInput(tokens(n), steps, "random"))
    return out[:budget]
