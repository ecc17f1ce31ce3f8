"""Running one reference op (a torch module) on a given input, in its own precision or with its
operands rounded to a lower one: the two measurements of the dual test.

Only ops whose output depends on their input alone are replayed: linear projections,
norms, MLPs, embeddings, activations, the lm_head. Attention and whole decoder layers read a
KV cache and positions that one recorded input does not carry; they are left out, and said so.
"""

from __future__ import annotations

import copy
import re
from typing import Any

import numpy as np

__all__ = ["module_of", "why_not_replayable", "run_op", "ROUNDINGS"]

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


def _round(t: Any, dtype: str) -> Any:
    import torch

    return t.to(getattr(torch, dtype)).to(t.dtype) if t.is_floating_point() else t


def run_op(module: Any, x: np.ndarray, *, rounding: str | None = None) -> np.ndarray:
    """``module(x)`` as float64 numpy (the first output of a tuple). ``rounding``: the
    input and every floating-point parameter rounded to that dtype first (a copy of the
    module; the arithmetic stays in the module's own dtype)."""
    import torch

    param = next(iter(module.parameters()), None)
    device = param.device if param is not None else torch.device("cpu")
    dtype = param.dtype if param is not None else torch.float32
    t = torch.from_numpy(np.ascontiguousarray(x))
    t = t.to(device=device, dtype=dtype) if t.is_floating_point() else t.to(device=device)
    op = module
    if rounding is not None:
        op = copy.deepcopy(module)
        with torch.no_grad():
            for p in op.parameters():
                p.copy_(_round(p, rounding))
        t = _round(t, rounding)
    with torch.no_grad():
        out = op(t)
    if isinstance(out, (tuple, list)):
        out = out[0]
    return out.detach().to("cpu", torch.float64).numpy()
