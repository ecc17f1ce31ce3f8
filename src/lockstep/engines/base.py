"""The one small base every engine adapter shares: load, tokenize, run steps, close."""

from __future__ import annotations

import os
import time
from abc import ABC, abstractmethod
from typing import TYPE_CHECKING, Any, Callable, Iterable, Sequence

import numpy as np

from ..errors import UsageError

if TYPE_CHECKING:
    from ..capture.recorder import Recorder

__all__ = ["Engine", "timed_steps"]


def timed_steps(steps: Iterable[Any]) -> list[float]:
    """Seconds each item of a greedy-decoding generator took (each item is yielded once its
    step's token is known): the step times, prefill first."""
    times: list[float] = []
    t0 = time.perf_counter()
    for _ in steps:
        t1 = time.perf_counter()
        times.append(t1 - t0)
        t0 = t1
    return times


class Engine(ABC):
    """An inference engine lockstep can drive. Lifecycle: ``load``, ``generate`` (any number
    of times), ``close``; usable as a context manager."""

    #: the engine's name in dump metadata ("transformers", "llama.cpp", ...)
    name = "engine"
    #: native code that can die of a signal: ``open_engine`` runs it in its own process
    native = False

    def __init__(self, spec: str) -> None:
        self.spec = spec

    @abstractmethod
    def load(self) -> None:
        """Load the model; raise LockstepError for a user's mistake (bad path, missing extra)."""

    @abstractmethod
    def tokenize(self, text: str) -> list[int]:
        """Token ids of ``text`` as this engine's tokenizer gives them."""

    @abstractmethod
    def generate(self, rec: Recorder, prompt_ids: Sequence[int], decode: int, *,
                 forced: Sequence[int] | None = None) -> list[int]:
        """Record the prefill as step 0 and ``decode`` greedy decode steps as steps 1..N.

        ``forced`` teacher-forces the tokens fed at each decode step (the reference's greedy
        tokens), so one near-tie does not make every later step incomparable. Returns the
        greedy token chosen at each step.
        """

    def record_run(self, out: str | os.PathLike[str], meta: dict[str, Any],
                   prompt_ids: Sequence[int], decode: int, *,
                   forced: Sequence[int] | None = None, data: bool | str = True,
                   overwrite: bool = False, include: Sequence[str] | None = None,
                   on_step: Callable[[int], Any] | None = None,
                   exclude: Sequence[str] | None = None,
                   layers: Sequence[int] | None = None) -> list[int]:
        """Record ``generate`` into a new dump at ``out`` with ``meta`` in its header, and the
        greedy tokens as ``generated_token_ids``; ``on_step`` hears each step as it opens;
        ``include``/``exclude``/``layers``: which records to keep (``lockstep.record``)."""
        from ..capture.recorder import record

        with record(out, meta=meta, data=data, overwrite=overwrite, include=include,
                    exclude=exclude, layers=layers) as rec:
            if on_step is not None:
                on_step(rec.current_step)
                rec.on_step = on_step
            chosen = self.generate(rec, prompt_ids, decode, forced=forced)
            rec.add_meta(generated_token_ids=chosen)
        return chosen

    #: the engine packs a batch's tokens into one flat run (vLLM, SGLang) rather than padding
    #: rows; only what lockstep says while it records depends on it
    batch_packed = False

    def can_batch(self) -> bool:
        """Whether the engine runs batches (overrides ``generate_batch``)."""
        return type(self).generate_batch is not Engine.generate_batch

    def no_batch(self) -> UsageError:
        """The error for a batch asked of an engine that cannot run one."""
        return UsageError(f"{self.spec}: the {self.name} engine cannot run a batch (--batch); "
                          "the zoo engine can")

    def generate_batch(self, rec: Recorder, prompts: Sequence[Sequence[int]], decode: int, *,
                       forced: Sequence[Sequence[int] | None] | None = None,
                       padding: str = "left", join_at: Sequence[int] | None = None
                       ) -> list[list[int]]:
        """Record ``prompts`` run as one batch: each step is one forward of the sequences
        running then. Either the dump's ``batch`` metadata says which row is which sequence
        and where its real tokens are, or each step records its ``input_ids`` and
        ``positions`` and lockstep finds that from them (docs/batching.md); a declared
        layout is checked against the recorded ids. ``join_at[i]``: the batch step sequence
        i joins at (continuous batching). Returns each sequence's chosen tokens."""
        raise self.no_batch()

    def decode_logits_batch(self, prompts: Sequence[Sequence[int]], steps: int, *,
                            forced: Sequence[Sequence[int] | None] | None = None,
                            padding: str = "left", join_at: Sequence[int] | None = None
                            ) -> list[tuple[list[int], np.ndarray]]:
        """``decode_logits`` of every prompt, run as one batch (as ``generate_batch`` runs
        them): per prompt, its tokens and its (steps, vocab) logits."""
        raise self.no_batch()

    def decode_logits(self, prompt_ids: Sequence[int], steps: int, *,
                      forced: Sequence[int] | None = None) -> tuple[list[int], np.ndarray]:
        """Greedy decoding without recording: ``steps`` generated tokens and their logits.

        Returns (the greedy token at each step, float32 logits of shape ``(steps, vocab)``).
        Row 0 is the prefill's last-position logits; row i (i >= 1) comes from feeding
        ``forced[i-1]`` when ``forced`` is given (teacher forcing), else the greedy token of
        row i-1.
        """
        raise UsageError(f"{self.spec}: the {self.name} engine cannot report logits")

    def step_times(self, prompt_ids: Sequence[int], steps: int) -> list[float]:
        """Seconds of each greedy step, the prefill first (``steps`` >= 1), for benchmarks.

        This default estimates them from two ``decode_logits`` calls (one step, then
        ``steps``): the prefill, then the mean decode step repeated. Engines that can time
        each step override it."""
        t0 = time.perf_counter()
        self.decode_logits(prompt_ids, 1)
        prefill = time.perf_counter() - t0
        if steps <= 1:
            return [prefill]
        t0 = time.perf_counter()
        self.decode_logits(prompt_ids, steps)
        per_step = max(time.perf_counter() - t0 - prefill, 0.0) / (steps - 1)
        return [prefill] + [per_step] * (steps - 1)

    def torch_module(self) -> Any:
        """The root ``torch.nn.Module`` the engine runs, where there is one (module timing)."""
        return None

    def max_positions(self) -> int | None:
        """How many positions the model takes (its trained context), where known."""
        return None

    def chat_tokens(self, messages: list[dict[str, str]]) -> list[int]:
        """Token ids of chat ``messages`` (``{"role", "content"}``) through the model's chat
        template, ending with the prompt for the assistant's turn."""
        raise UsageError(f"{self.spec}: the {self.name} engine has no chat template; "
                         "give plain prompts (no --chat, no \"messages\")")

    def detokenize(self, ids: Sequence[int], *, skip_special: bool = False) -> str | None:
        """The text of token ids, or None when this engine cannot decode them."""
        return None

    def meta(self) -> dict[str, Any]:
        """Run metadata for the dump header."""
        return {"engine": self.name, "spec": self.spec}

    def close(self) -> None:  # noqa: B027 - a default that releases nothing, not abstract
        """Release the model."""

    def __enter__(self) -> Engine:
        self.load()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
