"""The inputs ``lockstep fuzz`` tries, in order, from a seed: the boundary cases first (an
empty prompt, lengths 1 and 2 and around every power of two, the KV block size and the
context limit, decode steps across a block boundary and up to the limit, repeated tokens,
special tokens inside a prompt), then random prompts. Numpy only."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping

import numpy as np

__all__ = ["FuzzInput", "Space", "boundary_lengths", "generate", "space_of"]

#: the length and decode steps of the first input, whose KL measures the engines' drift
BASELINE = (8, 4)
#: greedy steps of a boundary input: the prefill and one decode step, so that the decode
#: check (decode against the engine's own prefill) runs on it too
STEPS = 2
#: the meta keys an engine may give its KV block size under
BLOCK_KEYS = ("kv_block_size", "block_size", "page_size")
SPECIAL_NAMES = ("bos", "eos", "pad")


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
        n = len(self.tokens)
        head = f"{n} token{'s' * (n != 1)}, {self.steps} step{'s' * (self.steps != 1)}"
        if not n:
            return head
        ids = [str(t) for t in self.tokens]
        if n > shown:
            ids = ids[: shown // 2] + ["..."] + ids[-(shown // 2):]
        return f"{head}: {' '.join(ids)}"

    def to_json(self) -> dict[str, Any]:
        return {"tokens": list(self.tokens), "steps": self.steps, "why": self.why}


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


def generate(space: Space, budget: int, seed: int) -> list[FuzzInput]:
    """``budget`` inputs, the same for the same space and seed: the baseline, the boundary
    cases, then random prompts."""
    rng = np.random.default_rng(seed)
    cap = space.max_length

    def tokens(n: int) -> tuple[int, ...]:
        return tuple(int(t) for t in rng.integers(0, space.vocab, n))

    def fits(n: int, steps: int) -> bool:
        return n + steps - 1 <= cap

    out: list[FuzzInput] = []
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
    while len(out) < budget:  # random lengths, log-uniform, and random steps
        n = int(np.exp(rng.uniform(0, np.log(cap))))
        steps = int(rng.integers(1, 9))
        n = max(1, min(n, cap - steps + 1))
        out.append(FuzzInput(tokens(n), steps, "random"))
    return out[:budget]
