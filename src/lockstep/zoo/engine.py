"""The bug zoo as a lockstep engine: ``zoo:PATH``, a transformers model directory or a GGUF file.

``ZooEngine(spec, path, bug="wrong_kv_slot")`` runs the zoo's own Llama/Qwen3 implementation
with one bug switched on (``bugs.BUGS``); with none it matches transformers to float32
precision. torch is imported only when the engine loads.
"""

from __future__ import annotations

import itertools
from functools import partial
from pathlib import Path
from time import perf_counter
from typing import TYPE_CHECKING, Any, Callable, Sequence

import numpy as np

from ..engines.tokenizer import TransformersTokenizerEngine
from ..errors import UsageError
from ..extras import require
from .boundary_bugs import BLOCK_SIZE, BOUNDARY_BUGS
from .bugs import get_bug

if TYPE_CHECKING:
    from ..capture.recorder import Recorder
    from .model import Transformer
    from .runner import Generation

__all__ = ["ZooEngine", "DERIVED_INPUTS"]

_DTYPES = ("float32", "float64", "bfloat16", "float16")
#: module inputs recorded as tensors of their own: the attention heads before the output
#: projection, the residual sum before the MLP norm, the SwiGLU product
DERIVED_INPUTS = ("*.attention.wo", "*.ffn_norm", "*.feed_forward.w2")
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json")


def _torch() -> Any:
    return require("torch", "hf")


def _tokenizer(directory: Path) -> Any:
    """transformers' tokenizer of a model directory, or None when it has no tokenizer files
    (token ids can still be given directly)."""
    if not any((directory / f).is_file() for f in _TOKENIZER_FILES):
        return None  # transformers would make an empty tokenizer from the config alone
    try:
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(directory, local_files_only=True)
    except (ImportError, OSError, ValueError, TypeError):
        return None


class ZooEngine(TransformersTokenizerEngine):
    """The zoo's mini inference engine: paged KV cache, prefill and decode, one optional bug.

    ``vm=True`` runs decode's QKV projection, QK-norm and RoPE in the blocked decode VM
    (forced on by ``bug="blocked_qk_norm"``); ``temperature`` above 0 samples with a
    generator seeded by ``seed``, which also seeds the random init of weights never loaded.
    """

    name = "zoo"

    def __init__(self, spec: str, path: str, *, bug: str | None = None, dtype: str = "float32",
                 vm: bool = False, temperature: float = 0.0, seed: int = 0,
                 device: str = "cpu", page_size: int = 4) -> None:
        super().__init__(spec)
        if dtype not in _DTYPES:
            raise UsageError(f"--dtype {dtype!r}: the zoo runs {', '.join(_DTYPES)}")
        if temperature < 0:
            raise UsageError(f"temperature {temperature} is negative; use 0 for greedy")
        if bug not in BOUNDARY_BUGS:
            get_bug(bug)  # an unknown name fails here, before anything loads
        self.path = Path(path)
        self.source = self.path  # what the user named (a GGUF file is converted)
        self.bug = bug or None
        self.dtype = dtype
        self.vm = vm or bug == "blocked_qk_norm"
        self.temperature = temperature
        self.seed = seed
        self.device = device
        self.page_size = BLOCK_SIZE if bug == "kv_block_off_by_one" else page_size
        self.model: Transformer | None = None  #: the torch module, once loaded
        self.tokenizer: Any = None

    @classmethod
    def from_transformers(cls, hf_model: Any, *, spec: str = "zoo:transformers-model",
                          **options: Any) -> ZooEngine:
        """A loaded engine with the weights of a live transformers model (Llama or Qwen3)."""
        engine = cls(spec, "<in memory>", **options)
        engine._build(hf_model.config.to_dict(), hf_model.state_dict())
        return engine

    def load(self) -> None:
        if self.path.suffix == ".gguf" and self.path.is_file():
            from ..engines.hf import gguf_as_safetensors

            self.path = gguf_as_safetensors(self.path)
        if not (self.path / "config.json").is_file():
            raise UsageError(f"{self.spec}: {self.path} is not a transformers model directory "
                             "(config.json and safetensors) or a GGUF file")
        _torch()
        from .weights import read_checkpoint

        config, tensors = read_checkpoint(self.path)
        self._build(config, tensors)
        self.tokenizer = _tokenizer(self.path)

    def _build(self, config: dict[str, Any], tensors: Any) -> None:
        torch = _torch()
        from .config import MOE_FAMILIES, ModelArgs
        from .moe import build_moe
        from .weights import build

        moe = config.get("model_type") in MOE_FAMILIES
        if self.bug not in BOUNDARY_BUGS:
            get_bug(self.bug,
                    config["model_type"] if moe else ModelArgs.from_config(config).family)
        self.model = (build_moe if moe else build)(
            config, tensors, bug=self.bug, dtype=getattr(torch, self.dtype),
            device=self.device, seed=self.seed, vm=self.vm)

    def meta(self) -> dict[str, Any]:
        meta = {**super().meta(), "model": str(self.source), "dtype": self.dtype,
                "compute_dtype": self.dtype, "device": self.device, "bug": self.bug,
                "vm": self.vm, "temperature": self.temperature, "page_size": self.page_size}
        if self.model is not None:
            args = self.model.args
            meta.update(family=args.family, architecture=f"zoo-{args.family}",
                        vocab_size=args.vocab_size, head_dim=args.head_dim,
                        n_heads=args.n_heads, n_kv_heads=args.n_kv_heads)
        return meta

    def _run(self, prompt_ids: Sequence[int], decode: int, forced: Sequence[int] | None,
             rec: Recorder | None = None,
             on_forward: Callable[[Any], None] | None = None) -> Generation:
        from .runner import Runner

        if self.model is None:
            raise UsageError(f"{self.spec}: load() the engine first")
        if not prompt_ids and self.bug != "empty_prompt_crash":
            raise UsageError(f"{self.spec}: the prompt has no tokens")
        if rec is not None:
            rec.watch(self.model, inputs=DERIVED_INPUTS)
            on_forward = partial(rec.capture, "input_ids", role="input")
        runner = Runner(self.model, page_size=self.page_size, temperature=self.temperature,
                        seed=self.seed, vm=self.vm, on_forward=on_forward)
        return runner.run(list(prompt_ids), decode, forced)

    def _run_batch(self, prompts: Sequence[Sequence[int]], decode: int,
                   forced: Sequence[Sequence[int] | None] | None, padding: str,
                   join_at: Sequence[int] | None, rec: Recorder | None = None) -> Any:
        from .batch_runner import PADDING, BatchRunner, Request

        if padding not in PADDING:
            raise UsageError(f"--padding {padding!r}: the zoo pads left or right")
        if self.model is None:
            raise UsageError(f"{self.spec}: load() the engine first")
        joins = list(join_at) if join_at is not None else [0] * len(prompts)
        requests = [Request(list(p), joins[i], None if forced is None or forced[i] is None
                            else list(forced[i]))  # type: ignore[arg-type]
                    for i, p in enumerate(prompts)]
        on_forward = None
        if rec is not None:
            rec.watch(self.model, inputs=DERIVED_INPUTS)
            on_forward = partial(rec.capture, "input_ids", role="input")
        runner = BatchRunner(self.model, page_size=self.page_size, padding=padding,
                             temperature=self.temperature, seed=self.seed,
                             on_forward=on_forward)
        result = runner.run_batch(requests, decode)
        if rec is not None:
            rec.add_meta(batch={"layout": "padded", "padding": padding, "join_at": result.joined,
                                "prompts": [list(p) for p in prompts], "steps": result.steps,
                                "generated_token_ids": result.tokens})
        return result

    def generate_batch(self, rec: Recorder, prompts: Sequence[Sequence[int]], decode: int, *,
                       forced: Sequence[Sequence[int] | None] | None = None,
                       padding: str = "left", join_at: Sequence[int] | None = None
                       ) -> list[list[int]]:
        tokens: list[list[int]] = self._run_batch(prompts, decode, forced, padding, join_at,
                                                  rec).tokens
        return tokens

    def decode_logits_batch(self, prompts: Sequence[Sequence[int]], steps: int, *,
                            forced: Sequence[Sequence[int] | None] | None = None,
                            padding: str = "left", join_at: Sequence[int] | None = None
                            ) -> list[tuple[list[int], np.ndarray]]:
        if steps < 1:
            raise UsageError(f"decode_logits_batch needs 1 or more steps, not {steps}")
        result = self._run_batch(prompts, steps - 1, forced, padding, join_at)
        return [(tokens, np.stack([r.cpu().numpy() for r in rows]).astype(np.float32))
                for tokens, rows in zip(result.tokens, result.logits)]

    def step_times(self, prompt_ids: Sequence[int], steps: int) -> list[float]:
        ticks: list[float] = []  # when each forward starts
        self._run(prompt_ids, steps - 1, None, on_forward=lambda _: ticks.append(perf_counter()))
        ticks.append(perf_counter())
        return [b - a for a, b in itertools.pairwise(ticks)]

    def torch_module(self) -> Any:
        return self.model

    def generate(self, rec: Recorder, prompt_ids: Sequence[int], decode: int, *,
                 forced: Sequence[int] | None = None) -> list[int]:
        return self._run(prompt_ids, decode, forced, rec).tokens

    def decode_logits(self, prompt_ids: Sequence[int], steps: int, *,
                      forced: Sequence[int] | None = None) -> tuple[list[int], np.ndarray]:
        if steps < 0:
            raise UsageError(f"decode_logits needs 0 or more steps, not {steps}")
        if steps == 0:
            return [], np.zeros((0, self.model.args.vocab_size if self.model else 0), np.float32)
        result = self._run(prompt_ids, steps - 1, forced)
        logits = np.stack([row.cpu().numpy() for row in result.logits]).astype(np.float32)
        return result.tokens, logits

    def close(self) -> None:
        self.model = None
