"""The engine kinds lockstep knows, one line each: ``kind -> "module:Factory"``, imported only
when a spec names that kind (as Polygraphy's tool registry does).

Adding an engine is its own module plus one ``EngineKind`` line in ``KINDS``. Everything else
that depends on the kind reads it from here: which engines take a ``dtype`` or a ``device``
(the CLI passes them only to those), the spec lists in help text, the errors for an unknown
engine or an option it does not take, the options a dump's metadata gives back (``rerun``),
and ``dump:DIR``, which names an existing recording rather than an engine.

A factory is called as ``Factory(spec, target, **options)`` (``target`` is the spec after its
``kind:``) and returns an ``Engine``, not yet loaded.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import UsageError

if TYPE_CHECKING:
    from .base import Engine

__all__ = [
    "KINDS",
    "EngineKind",
    "construct",
    "find_kind",
    "kinds_epilog",
    "kinds_with",
    "recording",
    "spec_help",
    "takes",
]


@dataclass(frozen=True)
class EngineKind:
    """One kind of engine spec."""

    kind: str  #: the spec's prefix, before the colon
    factory: str | None  #: "module:Name", imported lazily; None: not an engine (``dump:``)
    about: str  #: one line, for help text
    examples: tuple[str, ...]  #: example specs, for help text and errors
    dtype: bool = False  #: takes ``dtype=`` (float32, bfloat16, ...)
    device: bool = False  #: takes ``device=`` (a torch device)
    native: bool = False  #: native code: ``open_engine`` runs it in a process of its own
    module_tree: bool = False  #: may run a torch module tree (replay, ``weights``)
    from_meta: tuple[str, ...] = ()  #: options a dump's metadata gives back (replay)
    requires: tuple[str, ...] = ()  #: modules it imports (``lockstep doctor`` tries them)

    def load_factory(self) -> Callable[..., Engine]:
        """The factory, imported now."""
        assert self.factory is not None, self.kind
        module, _, name = self.factory.partition(":")
        factory: Callable[..., Engine] = getattr(importlib.import_module(module), name)
        return factory


#: every kind, in the order help text lists them
KINDS: tuple[EngineKind, ...] = (
    EngineKind("hf", "lockstep.engines.hf:HFEngine",
               "transformers, offline, on a safetensors model directory or a GGUF file",
               ("hf:DIR", "hf:FILE.gguf"), dtype=True, device=True, module_tree=True,
               from_meta=("dtype",), requires=("torch", "transformers")),
    EngineKind("llamacpp", "lockstep.engines.llamacpp:LlamaCppEngine",
               "llama.cpp through llama-cpp-python, in a process of its own",
               ("llamacpp:FILE.gguf",), native=True, requires=("llama_cpp",)),
    EngineKind("zoo", "lockstep.zoo.engine:ZooEngine",
               "the bug zoo's mini engine on a model directory or a GGUF file, with "
               "bug=NAME to switch a bug on", ("zoo:PATH",), dtype=True, device=True,
               module_tree=True, from_meta=("dtype", "bug", "vm"),
               requires=("torch", "transformers")),
    EngineKind("py", "lockstep.engines.python:load_python_engine",
               "your own engine in Python, a lockstep.engines.Engine subclass",
               ("py:module:Factory",), module_tree=True),
    EngineKind("dump", None, "an existing recording, used instead of running an engine",
               ("dump:DIR",)),
)

_BY_KIND = {k.kind: k for k in KINDS}


def _words(items: list[str]) -> str:
    """``a``, ``a and b``, ``a, b and c``."""
    return items[0] if len(items) == 1 else f"{', '.join(items[:-1])} and {items[-1]}"


def find_kind(spec: str) -> EngineKind | None:
    """The kind a spec names, or None when it names none this registry knows."""
    kind, sep, _ = spec.partition(":")
    return _BY_KIND.get(kind) if sep else None


def takes(spec: str, option: str) -> bool:
    """Whether the engine ``spec`` names takes ``option`` (``"dtype"`` or ``"device"``)."""
    found = find_kind(spec)
    return bool(found is not None and getattr(found, option, False))


def kinds_with(flag: str) -> str:
    """The kinds whose ``flag`` is set (``dtype``, ``device``, ``module_tree``...), for help
    text: ``hf:/zoo:``."""
    return "/".join(f"{k.kind}:" for k in KINDS if getattr(k, flag, False))


def recording(spec: str) -> Path | None:
    """The dump a ``dump:DIR`` spec names, or None for an engine spec."""
    found = find_kind(spec)
    if found is None or found.factory is not None:
        return None
    return Path(spec.partition(":")[2])


def spec_help(*, recordings: bool = False, module_tree: bool = False) -> str:
    """``engine spec: hf:DIR, ...`` for a command's help: every engine kind, or only those
    that may run a torch module tree; with ``recordings``, ``dump:DIR`` too."""
    examples = [e for k in KINDS
                if (k.factory is not None or recordings) and (k.module_tree or not module_tree)
                for e in k.examples]
    return "engine spec: " + ", ".join(examples)


def kinds_epilog(*, recordings: bool = False) -> str:
    """Each kind's examples and what it is, for the end of a command's help."""
    return "Engine specs: " + "; ".join(
        f"{' or '.join(k.examples)} ({k.about})" for k in KINDS
        if k.factory is not None or recordings) + "."


def construct(spec: str, **options: Any) -> Engine:
    """The engine a spec names, in this process, not yet loaded."""
    kind, sep, target = spec.partition(":")
    if not sep or not target:
        raise UsageError(f"engine spec {spec!r} should look like 'hf:PATH'")
    found = _BY_KIND.get(kind)
    if found is None:
        known = ", ".join(k.kind for k in KINDS if k.factory is not None)
        raise UsageError(f"unknown engine {kind!r} in {spec!r}; known engines: {known}")
    if found.factory is None:
        raise UsageError(f"{spec} names a recording, not an engine to run ({found.kind}: is "
                         "for the reference or candidate of diff)")
    factory = found.load_factory()
    try:
        return factory(spec, target, **options)
    except TypeError as exc:
        text = str(exc)
        if "__init__() missing" in text and "required" in text:  # a py: engine's own option
            needed = text.split(": ", 1)[-1]
            raise UsageError(f"{spec} needs the option {needed}: give each as KEY=VALUE "
                             "(--opt, --ref-opt or --cand-opt, as the command names them)"
                             ) from None
        if "unexpected keyword argument" not in text:
            raise
        dtype = _words([f"{k.kind}:" for k in KINDS if k.dtype])
        raise UsageError(f"{spec} takes no option {text.rsplit(' ', 1)[-1]} (given: "
                         f"{', '.join(sorted(options)) or 'none'}; a dtype is for {dtype} "
                         "engines)") from None

