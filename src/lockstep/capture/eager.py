"""Recording from inside ``torch.compile``'d code: the recorder's hooks run as plain Python.

TorchDynamo traces a compiled module's submodules together with their forward hooks, and a
recorder's hook (it copies tensors to the host and writes files) is nothing it can trace: it
failed the user's forward ("Cannot call numel() on tensor with symbolic sizes"). Each hook,
probe and trace wrapper therefore hands itself, while Dynamo traces it, to a copy marked
``torch.compiler.disable``: Dynamo breaks the graph there and runs it eagerly, on real
tensors. The compiled program runs in more, smaller graphs while it is recorded; its values
are the ones it computes. Outside compiled code the hook runs directly (one check, about
0.08 us a call, where a disabled function's wrapper costs 0.6 us).
"""

from __future__ import annotations

import functools
import sys
from typing import Any, Callable, TypeVar, cast

__all__ = ["eager"]

F = TypeVar("F", bound=Callable[..., Any])


def eager(fn: F, *, recursive: bool = True) -> F:
    """``fn``, run as plain Python where TorchDynamo would trace it (``recursive=False``:
    what it calls may still be compiled); ``fn`` itself where torch is not imported
    (nothing is compiled then)."""
    compiler = getattr(sys.modules.get("torch"), "compiler", None)
    disable = getattr(compiler, "disable", None)
    compiling = getattr(compiler, "is_compiling", None)
    if disable is None or compiling is None:
        return fn
    opaque = disable(fn, recursive=recursive)

    @functools.wraps(fn)
    def run(*args: Any, **kwargs: Any) -> Any:
        if compiling():  # True only while Dynamo traces this call
            return opaque(*args, **kwargs)
        return fn(*args, **kwargs)

    return cast(F, run)
