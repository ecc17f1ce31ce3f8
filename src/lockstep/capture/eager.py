"""Recording from inside ``torch.compile``'d code: the recorder's hooks run as plain Python.

TorchDynamo traces a compiled module's submodules together with their forward hooks, and a
recorder's hook (it copies tensors to the host and writes files) is nothing it can trace: it
failed the user's forward ("Cannot call numel() on tensor with symbolic sizes"). Each hook,
probe and trace wrapper therefore hands itself, while Dynamo traces it, to one function
marked ``torch.compiler.disable``: Dynamo breaks the graph there and runs the hook eagerly,
on real tensors. The compiled program runs in more, smaller graphs while it is recorded; its
values are the ones it computes.

Outside compiled code a hook costs one ``is_compiling()`` check more. The disabled function
is made once, at a watch where TorchDynamo is already imported (a model was compiled), else
the first time Dynamo traces a hook: making one imports TorchDynamo (about 1 s), and a
disabled wrapper per hook made the recording of SmolLM2's forward 1.21x a plain forward's
where it was 1.15x (benchmarks/capture_overhead.py).

``torch.compile(fullgraph=True)`` (vLLM's) refuses graph breaks: Dynamo's error then names
``lockstep_records_here`` and gives the reason, with what to do (record the model uncompiled,
or compiled without ``fullgraph``).
"""

from __future__ import annotations

import functools
import sys
from typing import Any, Callable, TypeVar, cast

__all__ = ["eager"]

F = TypeVar("F", bound=Callable[..., Any])

_OPAQUE: Callable[..., Any] | None = None
_REASON = ("lockstep records here, in plain Python: a graph break, which fullgraph=True "
           "refuses; record the model uncompiled (vLLM: enforce_eager=True) or compiled "
           "without fullgraph")


def lockstep_records_here(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """The hook, run eagerly: a graph break, which ``torch.compile(fullgraph=True)`` refuses
    (Dynamo's error names this function): record such a model eagerly (vLLM's
    ``enforce_eager=True``) or compiled without ``fullgraph``."""
    return fn(*args, **kwargs)


def _opaque(compiler: Any) -> Callable[..., Any]:
    """``lockstep_records_here``, never traced by Dynamo (nor what it calls): made once."""
    global _OPAQUE
    if _OPAQUE is None:
        try:
            _OPAQUE = compiler.disable(lockstep_records_here, reason=_REASON)
        except TypeError:  # a torch whose disable takes no reason
            _OPAQUE = compiler.disable(lockstep_records_here)
    return _OPAQUE


def eager(fn: F) -> F:
    """``fn``, run as plain Python where TorchDynamo would trace it; ``fn`` itself where
    torch is not imported (nothing is compiled then)."""
    compiler = getattr(sys.modules.get("torch"), "compiler", None)
    compiling = getattr(compiler, "is_compiling", None)
    if compiling is None or not hasattr(compiler, "disable"):
        return fn
    if "torch._dynamo" in sys.modules:  # already imported (a model compiled): cheap to make
        _opaque(compiler)  # now, so that Dynamo meets it, named, rather than its making

    @functools.wraps(fn)
    def run(*args: Any, **kwargs: Any) -> Any:
        if compiling():  # True only while Dynamo traces this call
            return _opaque(compiler)(fn, *args, **kwargs)
        return fn(*args, **kwargs)

    return cast(F, run)
