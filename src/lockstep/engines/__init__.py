"""Engine adapters. Each is an optional extra, imported only when its spec is used; the kinds
of spec, and what each takes, are listed once in ``registry.KINDS``."""

from __future__ import annotations

from .base import Engine
from .registry import construct

__all__ = ["Engine", "open_engine"]


def open_engine(spec: str, *, isolate: bool = True, **options: object) -> Engine:
    """An engine (not yet loaded) for a spec: ``hf:PATH``, ``llamacpp:FILE.gguf``,
    ``zoo:PATH`` (the bug zoo's mini engine) or ``py:module:Factory`` (a user's engine); the
    full list is ``lockstep.engines.registry.KINDS``.

    A native engine (llama.cpp) runs in its own process unless ``isolate`` is False, so that
    a crash in its code is an ``EngineCrashed`` error rather than the end of this process."""
    engine = construct(spec, **options)
    if isolate and engine.native:
        from .isolated import IsolatedEngine

        return IsolatedEngine(engine, dict(options))
    return engine
