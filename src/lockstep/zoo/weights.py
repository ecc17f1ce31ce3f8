"""Building a zoo Transformer and loading a transformers checkpoint's weights into it."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Callable, Mapping

import torch
from torch import Tensor

from ..errors import LockstepError, UsageError
from .config import ModelArgs
from .families import RENAMES
from .family_loading import after_load, skipped
from .lora import LoRALinear, attach_nan_adapter
from .model import Transformer

__all__ = ["zoo_to_hf", "build", "assemble", "read_checkpoint"]

# zoo name -> transformers name, for the parts of a name that differ
_RENAMES = (
    (r"tok_embeddings\.", "model.embed_tokens."),
    (r"layers\.(\d+)\.attention_norm\.", r"model.layers.\1.input_layernorm."),
    (r"layers\.(\d+)\.ffn_norm\.", r"model.layers.\1.post_attention_layernorm."),
    (r"layers\.(\d+)\.attention\.w([qkvo])\.", r"model.layers.\1.self_attn.\2_proj."),
    (r"layers\.(\d+)\.attention\.([qk]_norm)\.", r"model.layers.\1.self_attn.\2."),
    (r"layers\.(\d+)\.feed_forward\.w1\.", r"model.layers.\1.mlp.gate_proj."),
    (r"layers\.(\d+)\.feed_forward\.w2\.", r"model.layers.\1.mlp.down_proj."),
    (r"layers\.(\d+)\.feed_forward\.w3\.", r"model.layers.\1.mlp.up_proj."),
    (r"norm\.", "model.norm."),
    (r"output\.", "lm_head."),
)


def zoo_to_hf(name: str, family: str = "llama") -> str:
    """The transformers name of a zoo parameter (``layers.0.attention.wq.weight`` ->
    ``model.layers.0.self_attn.q_proj.weight``)."""
    for pattern, replacement in RENAMES.get(family, ()) + _RENAMES:
        renamed, count = re.subn("^" + pattern, replacement, name)
        if count:
            return renamed
    raise KeyError(name)


def read_checkpoint(directory: Path) -> tuple[dict[str, Any], dict[str, Tensor]]:
    """The config and every tensor of a transformers model directory (safetensors)."""
    from safetensors.torch import load_file

    config = json.loads((directory / "config.json").read_text())
    files = sorted(directory.glob("*.safetensors"))
    if not files:
        raise UsageError(f"{directory} has no .safetensors weights (the zoo reads no "
                         "pytorch_model.bin)")
    tensors: dict[str, Tensor] = {}
    for file in files:
        tensors.update(load_file(file))
    return config, tensors


def random_init(model: Transformer, seed: int) -> None:
    """Fill every parameter from a seeded generator: what a weight the loader never writes
    holds (a real engine's ``torch.empty`` gives whatever memory held; this is reproducible)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            param.normal_(0.0, 0.02, generator=generator)


#: a zoo parameter's name -> the checkpoint's name for it and its tensor (None: missing)
Lookup = Callable[[str], "tuple[str, Tensor | None]"]


def _load(model: Transformer, tensors: Mapping[str, Tensor], lookup: Lookup | None = None) -> None:
    """Copy the checkpoint's tensors into the model's parameters (``lookup`` finds each one;
    by default the transformers name ``zoo_to_hf`` gives)."""
    def by_name(name: str) -> tuple[str, Tensor | None]:
        source = zoo_to_hf(name, model.args.family)
        return source, tensors.get(source)

    state = {}
    for name in model.state_dict():
        if name == "output.weight" and model.args.tie_embeddings:
            continue  # the embedding matrix, loaded once
        if model.bug == "layer_not_loaded" and name.startswith("layers.1."):
            continue  # the bug: the loader never writes layer 1
        if skipped(model.bug, name):
            continue
        source, value = (lookup or by_name)(name)
        if value is None:
            raise LockstepError(f"the checkpoint has no {source} (for the zoo's {name})")
        state[name] = value
    model.load_state_dict(state, strict=False)


def build(config: Mapping[str, Any], tensors: Mapping[str, Tensor], *, bug: str | None = None,
          dtype: torch.dtype = torch.float32, device: str = "cpu", seed: int = 0,
          vm: bool = False) -> Transformer:
    """A zoo Transformer with the checkpoint's weights, in ``dtype`` on ``device``, eval mode."""
    args = ModelArgs.from_config(config, bug)
    if bug in ("layer_not_loaded", "nan_adapter") and args.n_layers < 2:
        raise UsageError(f"zoo bug {bug!r} is in layer 1; this model has {args.n_layers} layer")
    return assemble(Transformer(args), tensors, dtype=dtype, device=device, seed=seed, vm=vm,
                    nan_adapter="layers.1.attention.wq" if bug == "nan_adapter" else None)


def assemble(model: Transformer, tensors: Mapping[str, Tensor], *, dtype: torch.dtype,
             device: str, seed: int, vm: bool, nan_adapter: str | None = None,
             lookup: Lookup | None = None) -> Transformer:
    """Fill a built model: seeded random init, the checkpoint's weights (with the loader's
    bugs; ``lookup`` as ``_load`` takes it), a NaN LoRA adapter on the module ``nan_adapter``
    names, then ``dtype`` on ``device`` in eval mode (and the decode VM's fused QKV weights
    with ``vm``)."""
    random_init(model, seed)
    _load(model, tensors, lookup)
    after_load(model)
    if nan_adapter is not None:
        linear = model.get_submodule(nan_adapter)
        assert isinstance(linear, LoRALinear)
        attach_nan_adapter(linear, seed=seed)
    model = model.to(device=device, dtype=dtype).eval()
    if vm:
        model.fuse_qkv()
    return model
