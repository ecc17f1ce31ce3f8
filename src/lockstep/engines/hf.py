"""transformers as an engine: a local model directory (safetensors) or a GGUF file, offline.

transformers dequantizes a GGUF file to float32 when it loads it (about 16 s for SmolLM2-135M);
the conversion is saved once as safetensors under the cache directory (``LOCKSTEP_CACHE``,
default ``~/.cache/lockstep``) and loaded from there afterwards in well under a second.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator, Sequence

from ..errors import LockstepError, UsageError
from ..extras import require
from .base import timed_steps
from .forcing import fed_token
from .hf_attention import attention_meta
from .hf_rope import watch_rope
from .tokenizer import TransformersTokenizerEngine

if TYPE_CHECKING:
    from ..capture.recorder import Recorder

__all__ = ["HFEngine", "forward_step"]

_DTYPES = ("float32", "bfloat16", "float16", "float64")
DERIVED_INPUTS = ("*.self_attn.o_proj", "*.post_attention_layernorm", "*.mlp.down_proj",
                  "*.pre_feedforward_layernorm", "*.down_proj", "*.ln_2", "*.c_proj")


def _import() -> tuple[Any, Any]:
    """torch and transformers. Nothing reaches for a hub: every ``from_pretrained`` here is
    given ``local_files_only=True`` (the environment, ``HF_HUB_OFFLINE`` included, is left
    as the user set it)."""
    torch, transformers = require("torch", "hf"), require("transformers", "hf")
    transformers.utils.logging.disable_progress_bar()  # lockstep shows its own progress
    return torch, transformers


def forward_step(model: Any, ids: Any, cache: Any, **kwargs: Any) -> tuple[Any, Any]:
    """One forward with a KV cache: (the output, the cache for the next step). transformers
    5 names the cache ``cache`` (``past_key_values`` still works there, with a deprecation
    warning on every run); 4.x names it ``past_key_values``. The name is read off the model's
    signature, so neither prints a warning."""
    key = "cache" if _takes(model, "cache") else "past_key_values"
    out = model(input_ids=ids, use_cache=True, **{key: cache}, **kwargs)
    return out, (out["cache"] if key == "cache" else out["past_key_values"])


_PARAMS: dict[type, frozenset[str]] = {}


def _takes(model: Any, name: str) -> bool:
    """Whether the model's ``forward`` has a parameter called ``name``."""
    params = _PARAMS.get(type(model))
    if params is None:
        import inspect

        params = _PARAMS[type(model)] = frozenset(
            inspect.signature(type(model).forward).parameters)
    return name in params


def cache_dir() -> Path:
    """Where converted models are kept."""
    return Path(os.environ.get("LOCKSTEP_CACHE") or Path.home() / ".cache" / "lockstep")


def gguf_as_safetensors(gguf: Path) -> Path:
    """A transformers model directory converted from ``gguf`` (float32), made once and cached."""
    st = gguf.stat()
    key = hashlib.sha256(f"{gguf.resolve()}|{st.st_size}|{st.st_mtime_ns}".encode()).hexdigest()
    target = cache_dir() / "gguf" / f"{gguf.stem}-{key[:12]}"
    if (target / "config.json").is_file():
        return target
    torch, transformers = _import()
    print(f"lockstep: converting {gguf.name} to float32 through transformers, once (cached in "
          f"{target.parent})", file=sys.stderr)
    try:
        with _quiet_gguf_conversion():
            model = transformers.AutoModelForCausalLM.from_pretrained(
                gguf.parent, gguf_file=gguf.name, dtype=torch.float32, local_files_only=True)
            tokenizer = transformers.AutoTokenizer.from_pretrained(
                gguf.parent, gguf_file=gguf.name, local_files_only=True)
    except ImportError as exc:
        raise LockstepError(f"loading {gguf.name} through transformers needs the gguf extra: "
                            f"pip install 'lockstep[gguf]' ({exc})") from None
    except (OSError, ValueError) as exc:
        raise LockstepError(f"transformers could not read {gguf}: "
                            f"{str(exc).splitlines()[0]}") from None
    tmp = target.with_name(target.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    _save_plain(model, tmp)
    tokenizer.save_pretrained(tmp)
    tmp.replace(target) if not target.exists() else shutil.rmtree(tmp)
    return target


@contextmanager
def _quiet_gguf_conversion() -> Iterator[None]:
    """transformers draws a tqdm bar of its own while it dequantizes a GGUF file, outside its
    progress-bar switch (``disable_progress_bar`` does not reach it) and past tqdm's
    ``TQDM_DISABLE``, which tqdm reads once at import. We cannot change that code, so the
    module's ``tqdm`` name is pointed at a disabled bar for the conversion, and restored."""
    import functools
    import importlib

    try:
        module = importlib.import_module("transformers.modeling_gguf_pytorch_utils")
    except ImportError:
        module = None
    bar = getattr(module, "tqdm", None)
    if bar is None:
        yield
        return
    module.tqdm = functools.partial(bar, disable=True)  # type: ignore[union-attr]
    try:
        yield
    finally:
        module.tqdm = bar  # type: ignore[union-attr]


def _save_plain(model: Any, directory: Path) -> None:
    """Save a GGUF-loaded model as a plain float32 safetensors model (transformers refuses to
    serialise a model it marked as GGUF-quantized, though its weights are plain tensors)."""
    from safetensors.torch import save_file

    config = model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    directory.mkdir(parents=True)
    config.save_pretrained(directory)
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    if getattr(config, "tie_word_embeddings", False):
        state.pop("lm_head.weight", None)
    save_file(state, directory / "model.safetensors", metadata={"format": "pt"})


class HFEngine(TransformersTokenizerEngine):
    """A transformers causal LM loaded from a local directory, greedy decoding with KV cache."""

    name = "transformers"

    def __init__(self, spec: str, path: str, *, dtype: str = "float32",
                 device: str = "cpu") -> None:
        super().__init__(spec)
        if dtype not in _DTYPES:
            raise UsageError(f"--dtype {dtype!r}: choose one of {', '.join(_DTYPES)}")
        self.path = Path(path)
        self.dtype = dtype
        self.device = device
        self.source = self.path  # what the user named (a GGUF file is converted)
        self.model: Any = None
        self.tokenizer: Any = None

    def load(self) -> None:
        if self.path.suffix == ".gguf" and self.path.is_file():
            self.source = self.path
            self.path = gguf_as_safetensors(self.path)
        if not self.path.is_dir():
            raise UsageError(f"{self.spec}: {self.path} is not a directory with a "
                             "transformers model (config.json and safetensors weights)")
        if not (self.path / "config.json").is_file():
            raise UsageError(f"{self.spec}: {self.path} has no config.json")
        torch, transformers = _import()
        try:
            self.model = transformers.AutoModelForCausalLM.from_pretrained(
                self.path, dtype=getattr(torch, self.dtype), local_files_only=True,
                use_safetensors=True,
            ).to(self.device).eval()
        except (OSError, ValueError) as exc:
            raise LockstepError(f"{self.spec}: transformers could not load the model: "
                                f"{str(exc).splitlines()[0]}") from None
        try:
            self.tokenizer = transformers.AutoTokenizer.from_pretrained(
                self.path, local_files_only=True)
        except (OSError, ValueError, TypeError):
            self.tokenizer = None  # token ids can still be given directly

    def _greedy(self, prompt_ids: Sequence[int], steps: int,
                forced: Sequence[int] | None) -> Iterator[tuple[int, Any]]:
        """Greedy decoding with the KV cache: yields (token, last-position logits) per step."""
        import torch

        if self.model is None:
            raise UsageError(f"{self.spec}: load() the engine before decoding")
        if not prompt_ids:
            raise UsageError(f"{self.spec}: the prompt has no tokens")
        ids = torch.tensor([list(prompt_ids)], dtype=torch.long, device=self.device)
        past = None
        # only the last position's logits, as transformers' generate() computes them
        last_only = {"logits_to_keep": 1} if _takes(self.model, "logits_to_keep") else {}
        with torch.no_grad():
            for step in range(steps):
                out, past = forward_step(self.model, ids, past, **last_only)
                last = out.logits[0, -1]
                token = int(last.argmax())  # in the model's own dtype, as generate() picks
                yield token, last
                ids = torch.tensor([[fed_token(forced, step, token)]], dtype=torch.long,
                                   device=self.device)

    def decode_logits(self, prompt_ids: Sequence[int], steps: int, *,
                      forced: Sequence[int] | None = None) -> tuple[list[int], Any]:
        import numpy as np
        import torch

        chosen: list[int] = []
        rows = []
        for token, last in self._greedy(prompt_ids, steps, forced):
            chosen.append(token)
            rows.append(last.float().cpu())
        if not rows:
            return chosen, np.zeros((0, self.model.config.vocab_size), dtype=np.float32)
        return chosen, torch.stack(rows).numpy()

    def step_times(self, prompt_ids: Sequence[int], steps: int) -> list[float]:
        return timed_steps(self._greedy(prompt_ids, steps, None))

    def torch_module(self) -> Any:
        return self.model

    def max_positions(self) -> int | None:
        config = getattr(self.model, "config", None)
        n = getattr(config, "max_position_embeddings", None)
        return int(n) if n else None

    def meta(self) -> dict[str, Any]:
        config = self.model.config if self.model is not None else None
        return {**super().meta(), "model": str(self.source), "dtype": self.dtype,
                "compute_dtype": self.dtype, "device": self.device,
                "architecture": type(self.model).__name__ if self.model is not None else None,
                "vocab_size": getattr(config, "vocab_size", None),
                "n_heads": getattr(config, "num_attention_heads", None),
                "n_kv_heads": getattr(config, "num_key_value_heads", None),
                "n_ff": getattr(config, "intermediate_size", None),
                "rms_norm_eps": getattr(config, "rms_norm_eps", None),
                "head_dim": getattr(config, "head_dim", None) or (
                    config.hidden_size // config.num_attention_heads
                    if config is not None and getattr(config, "num_attention_heads", None)
                    else None), **attention_meta(config)}

    def generate(self, rec: Recorder, prompt_ids: Sequence[int], decode: int, *,
                 forced: Sequence[int] | None = None) -> list[int]:
        import torch

        # inputs that are tensors of their own in other engines: the attention heads before
        # the output projection, the residual sum before the MLP, the SwiGLU product
        rec.watch(self.model, inputs=DERIVED_INPUTS)
        ids = torch.tensor([list(prompt_ids)], dtype=torch.long, device=self.device)
        chosen: list[int] = []
        past = None
        with torch.no_grad(), watch_rope(rec, self.model):
            for step in range(decode + 1):
                rec.capture("input_ids", ids, role="input")
                out, past = forward_step(self.model, ids, past)
                token = int(out.logits[0, -1].float().argmax())
                chosen.append(token)
                ids = torch.tensor([[fed_token(forced, step, token)]], dtype=torch.long,
                                   device=self.device)
        return chosen
