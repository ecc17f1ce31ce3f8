"""Running one reference op (a torch module) on a given input, in its own precision or with its
operands rounded to a lower one: the two measurements of the dual test.

Only ops whose output depends on their input alone are replayed: linear projections,
norms, MLPs, embeddings, activations, the lm_head. Attention and whole decoder layers read a
KV cache and positions that one recorded input does not carry; they are left out, and said so.
"""

from __future__ import annotations

import copy
import functools
import re
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

__all__ = ["module_of", "why_not_replayable", "run_op", "ROUNDINGS", "GGUF_PREFIX",
           "gguf_rounding_fits", "gguf_weight_types", "Call", "CallTap", "tap_calls"]

#: precisions tried to explain an op's error: its operands (input and weights) rounded to
#: these, the arithmetic and the result in the reference's own precision
ROUNDINGS = ("bfloat16", "float16")
_SUFFIX = re.compile(r":(\d+|[A-Za-z_]\w*)$")
_STATEFUL = re.compile(r"attention|attn|decoderlayer|block$|model$|forcausallm", re.I)


def module_of(root: Any, ref_name: str) -> tuple[str, Any] | None:
    """The module a reference record is the output of (``name`` or ``name:0``), or None
    (an input record ``name:input.0``, or no such module)."""
    if ":input" in ref_name:
        return None
    name = _SUFFIX.sub("", ref_name)
    try:
        return name, root.get_submodule(name)
    except AttributeError:
        return None


def why_not_replayable(module: Any) -> str | None:
    """None when the module can be replayed on one recorded input, else why not."""
    cls = type(module).__name__
    if _STATEFUL.search(cls):
        return f"{cls} reads a KV cache and positions, not only its input"
    return None


#: a GGUF rounding: ``gguf:TYPE`` rounds the weights to that storage type and, for a
#: quantized type, the input to 8-bit blocks of 32 (Q8_0), as llama.cpp's CPU dot products
#: quantize their activations (Q8_0/Q8_1 by block; K-quants use blocks of 256, close to it)
GGUF_PREFIX = "gguf:"
_PLAIN_GGUF = {"F32": None, "F16": "float16", "BF16": "bfloat16", "F64": None}


def _gguf_round(t: Any, qtype: str) -> Any:
    """``t`` quantized to the GGUF type ``qtype`` and back (rows along its last dim)."""
    import torch
    from gguf import GGMLQuantizationType, quants

    kind = GGMLQuantizationType[qtype]
    arr = t.detach().to("cpu", torch.float32).numpy().reshape(-1, t.shape[-1])
    back = quants.dequantize(quants.quantize(np.ascontiguousarray(arr), kind), kind)
    return torch.from_numpy(np.ascontiguousarray(back.reshape(t.shape))).to(t.device, t.dtype)


def gguf_rounding_fits(module: Any, qtype: str) -> bool:
    """Whether ``gguf:qtype`` can round this module: a linear-like weight whose rows are whole
    blocks of the type (and of Q8_0's 32 for its input), with the type known to ``gguf``."""
    try:
        from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
    except ImportError:
        return False
    weight = getattr(module, "weight", None)
    if weight is None or getattr(weight, "ndim", 0) != 2 or \
            qtype not in GGMLQuantizationType.__members__:
        return False
    if qtype in _PLAIN_GGUF:
        return True
    block = GGML_QUANT_SIZES[GGMLQuantizationType[qtype]][0]
    return weight.shape[-1] % block == 0 and weight.shape[-1] % 32 == 0


def _round(t: Any, dtype: str, *, activation: bool = False) -> Any:
    import torch

    if not t.is_floating_point():
        return t
    if dtype.startswith(GGUF_PREFIX):
        qtype = dtype[len(GGUF_PREFIX):]
        if qtype in _PLAIN_GGUF:
            plain = _PLAIN_GGUF[qtype]
            return t if plain is None else _round(t, plain)
        if activation:
            return _gguf_round(t, "Q8_0")
        return _gguf_round(t, qtype) if t.ndim == 2 else t  # biases and norms stay
    return t.to(getattr(torch, dtype)).to(t.dtype)


def run_op(module: Any, x: np.ndarray, *, rounding: str | None = None) -> np.ndarray:
    """``module(x)`` as float64 numpy (the first output of a tuple). ``rounding``: the
    input and every floating-point parameter rounded to that dtype first (a copy of the
    module; the arithmetic stays in the module's own dtype), or ``gguf:TYPE`` (see
    ``GGUF_PREFIX``)."""
    import torch

    param = next(iter(module.parameters()), None)
    device = param.device if param is not None else torch.device("cpu")
    dtype = param.dtype if param is not None else torch.float32
    t = torch.from_numpy(np.array(x, order="C"))  # a copy: dump reads are read-only views
    t = t.to(device=device, dtype=dtype) if t.is_floating_point() else t.to(device=device)
    op = module
    if rounding is not None:
        op = copy.deepcopy(module)
        with torch.no_grad():
            for p in op.parameters():
                p.copy_(_round(p, rounding))
        t = _round(t, rounding, activation=True)
    with torch.no_grad():
        out = op(t)
    if isinstance(out, (tuple, list)):
        out = out[0]
    return out.detach().to("cpu", torch.float64).numpy()


def _detach(value: Any) -> Any:
    """A tensor cloned off the graph (tuples and lists of tensors too); anything else as is."""
    if hasattr(value, "detach"):
        return value.detach().clone()
    if isinstance(value, (tuple, list)):
        return type(value)(_detach(v) for v in value)
    return value


def _tensor_args(args: Sequence[Any], kwargs: dict[str, Any]) -> list[tuple[int | str, Any]]:
    """A call's tensor arguments with their position or keyword, positional first."""
    keyed: list[tuple[int | str, Any]] = [*enumerate(args), *kwargs.items()]
    return [(k, v) for k, v in keyed if hasattr(v, "detach")]


def input_key(args: Sequence[Any], kwargs: dict[str, Any]) -> int | str | None:
    """Which argument of a module call carries its input: the first floating-point tensor,
    positional before keyword (vLLM calls ``self_attn(positions, hidden_states)``, the integer
    positions first; transformers ``self_attn(hidden_states=...)``); for a module that takes
    no floats (an embedding's ids), the first tensor. Its position, its keyword, or None."""
    tensors = _tensor_args(args, kwargs)
    floats = [k for k, v in tensors if v.is_floating_point()]
    return floats[0] if floats else tensors[0][0] if tensors else None


@dataclass
class Call:
    """One call of a module as it ran: its arguments and its first output (torch, cloned).
    Its input is the argument ``input_key`` names."""

    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    output: Any

    @property
    def input_key(self) -> int | str:
        """The position or the keyword of the argument that carries the input."""
        key = input_key(self.args, self.kwargs)
        assert key is not None  # (CallTap keeps calls with a tensor argument only)
        return key

    @property
    def input(self) -> Any:
        key = self.input_key
        return self.args[key] if isinstance(key, int) else self.kwargs[key]

    @property
    def second_activation(self) -> str | None:
        """Another floating-point tensor argument shaped as the input, where there is one
        (vLLM's fused ``norm(x, residual)`` adds its residual): the call then takes more than
        its input, and run on another engine's input alone it is not the same op. Its
        position or keyword, as text."""
        key, x = self.input_key, self.input
        for k, v in _tensor_args(self.args, self.kwargs):
            if k != key and v.is_floating_point() and tuple(v.shape) == tuple(x.shape):
                return f"argument {k}" if isinstance(k, int) else f"{k}="
        return None

    def with_input(self, x: Any) -> tuple[tuple[Any, ...], dict[str, Any]]:
        """Its arguments with the input replaced by ``x``."""
        key = self.input_key
        if isinstance(key, int):
            return (*self.args[:key], x, *self.args[key + 1:]), self.kwargs
        return self.args, {**self.kwargs, key: x}

    @property
    def single_input(self) -> bool:
        """Called with its input alone (no positions, masks or cache beside it)."""
        return len(self.args) == 1 and not self.kwargs

    def numpy_io(self) -> tuple[np.ndarray, np.ndarray]:
        """Its input and output as numpy (floats as float32)."""
        x, y = self.input, self.output
        return (x.float().cpu().numpy() if x.is_floating_point() else x.cpu().numpy(),
                y.float().cpu().numpy())


class CallTap:
    """The calls of chosen modules at one step (the root module's n-th call), the first call
    of each: a targeted pass that keeps their inputs and outputs in memory."""

    def __init__(self, root: Any, modules: dict[str, Any], step: int) -> None:
        self.step = step
        self.calls = -1
        self.seen: dict[str, Call] = {}
        self.handles = [root.register_forward_pre_hook(self._count)]
        for name, module in modules.items():
            self.handles.append(module.register_forward_hook(self._keep(name), with_kwargs=True))

    def _count(self, module: Any, args: Any) -> None:
        self.calls += 1

    def _keep(self, name: str) -> Any:
        def hook(module: Any, args: Any, kwargs: Any, output: Any) -> None:
            if self.calls != self.step or name in self.seen:
                return
            y = output[0] if isinstance(output, (tuple, list)) else output
            if input_key(args, kwargs) is not None and hasattr(y, "detach"):
                self.seen[name] = Call(_detach(tuple(args)), {k: _detach(v) for k, v in
                                                              kwargs.items()}, _detach(y))
        return hook

    def close(self) -> None:
        for h in self.handles:
            h.remove()


def tap_calls(engine: Any, modules: dict[str, Any], prompt_ids: Sequence[int], step: int,
              forced: Sequence[int] | None) -> dict[str, Call]:
    """Run ``engine`` (loaded, with a module tree) on the prompt to ``step`` and return the
    chosen modules' calls at that step."""
    tap = CallTap(engine.torch_module(), modules, step)
    try:
        engine.decode_logits(list(prompt_ids), step + 1, forced=forced)
    finally:
        tap.close()
    return tap.seen


def gguf_weight_types(*metas: dict[str, Any]) -> dict[str, str]:
    """Canonical weight name -> GGUF storage type, from the first ``.gguf`` model file the
    dumps' metadata names (the candidate's first: it is the one that ran quantized); empty
    when none is named or it cannot be read."""
    from pathlib import Path

    for meta in metas:
        model = meta.get("model")
        if not isinstance(model, str) or not model.endswith(".gguf") or not Path(model).is_file():
            continue
        stat = Path(model).stat()
        return dict(_weight_types(str(Path(model).resolve()), stat.st_size, stat.st_mtime_ns))
    return {}


@functools.lru_cache(maxsize=4)
def _weight_types(path: str, size: int, mtime: int) -> tuple[tuple[str, str], ...]:
    """The GGUF file's (canonical weight name, storage type) pairs, read once per file
    version (the reader parses every metadata field, the vocabulary too: seconds)."""
    try:
        from ..checkpoint.gguf_file import GGUFFile
        from ..checkpoint.weight_names import canonical_weight

        return tuple((canonical_weight(t.name)[0], t.dtype) for t in GGUFFile(path).tensors())
    except Exception:  # unreadable or gguf missing: no GGUF rounding, never fatal
        return ()
