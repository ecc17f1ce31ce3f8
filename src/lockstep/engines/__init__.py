"""Engine adapters. Each is an optional extra, imported only when its spec is used."""

from __future__ import annotations

from ..errors import UsageError
from .base import Engine

__all__ = ["Engine", "open_engine"]


def open_engine(spec: str, *, isolate: bool = True, **options: object) -> Engine:
    """An engine (not yet loaded) for a spec: ``hf:PATH``, ``llamacpp:FILE.gguf``,
    ``zoo:PATH`` (the bug zoo's mini engine) or ``py:module:Factory`` (a user's engine).

    A native engine (llama.cpp) runs in its own process unless ``isolate`` is False, so that
    a crash in its code is an ``EngineCrashed`` error rather than the end of this process."""
    try:
        engine = _construct(spec, **options)
    except TypeError as exc:
        if "unexpected keyword argument" not in str(exc):
            raise
        raise UsageError(f"{spec} takes no option {str(exc).rsplit(' ', 1)[-1]} (given: "
                         f"{', '.join(sorted(options)) or 'none'}; a dtype is for hf: and zoo: "
                         "engines)") from None
    if isolate and engine.native:
        from .isolated import IsolatedEngine

        return IsolatedEngine(engine, dict(options))
    return engine


def _construct(spec: str, **options: object) -> Engine:
    kind, sep, target = spec.partition(":")
    if not sep or not target:
        raise UsageError(f"engine spec {spec!r} should look like 'hf:PATH'")
    if kind == "hf":
        from .hf import HFEngine

        return HFEngine(spec, target, **options)  # type: ignore[arg-type]
    if kind == "llamacpp":
        from .llamacpp import LlamaCppEngine

        return LlamaCppEngine(spec, target, **options)  # type: ignore[arg-type]
    if kind == "zoo":
        from ..zoo.engine import ZooEngine

        return ZooEngine(spec, target, **options)  # type: ignore[arg-type]
    if kind == "py":
        from .python import load_python_engine

        return load_python_engine(spec, target, **options)
    raise UsageError(f"unknown engine {kind!r} in {spec!r}; known engines: hf, llamacpp, zoo, py")
