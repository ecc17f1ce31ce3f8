"""Tracing plain Python functions by qualified name, wherever they were imported.

``from pkg.vm import run_layer`` copies a reference into the importing module, so patching
``pkg.vm.run_layer`` alone misses callers that imported it by name. We patch the defining
attribute and every module attribute that still points at the same function object, and say
which file the traced function came from (an installed copy can shadow the one being edited).
"""

from __future__ import annotations

import functools
import importlib
import inspect
import sys
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any, Callable

from ..errors import UsageError
from .eager import eager

if TYPE_CHECKING:
    from .surface import RecorderSurface

__all__ = ["TraceInfo", "trace_function", "step_at", "patch_function", "resolve"]


@dataclass(frozen=True)
class TraceInfo:
    """Which function was traced and where its code lives."""

    spec: str  #: as the user gave it, "pkg.mod:Class.method"
    name: str  #: the record name prefix, "pkg.mod.Class.method"
    file: str  #: source file of the traced code: check it is the copy you are editing
    line: int
    patched: tuple[str, ...] = field(default=())  #: every "module.attr" that now calls the tracer
    #: {"calls", "tensors"}: how often the traced function ran and the tensors it gave
    counts: dict[str, int] | None = field(default=None, compare=False)

    @property
    def empty(self) -> bool:
        """Called, yet not one tensor among its arguments or results."""
        counts = self.counts
        if not counts:
            return False
        return counts["calls"] > 0 and not counts["tensors"]

    def as_dict(self) -> dict[str, Any]:
        out = {"spec": self.spec, "name": self.name, "file": self.file, "line": self.line,
               "patched": list(self.patched)}
        if self.counts is not None:
            out.update(self.counts)
        return out

    def __str__(self) -> str:
        return (f"tracing {self.spec} from {self.file}:{self.line} "
                f"(patched {len(self.patched)}: {', '.join(self.patched)})")


def resolve(spec: str) -> tuple[Any, str, Any, str]:
    """``pkg.mod:Class.method`` -> (owner object, attribute, raw attribute value, module name)."""
    if ":" in spec:
        module_name, _, attr_path = spec.partition(":")
    else:
        module_name, _, attr_path = spec.rpartition(".")
    if not module_name or not attr_path:
        raise UsageError(f"cannot trace {spec!r}: give it as 'package.module:function' "
                         "or 'package.module:Class.method'")
    try:
        owner: Any = importlib.import_module(module_name)
    except ImportError as exc:
        raise UsageError(f"cannot trace {spec!r}: module {module_name!r} does not import "
                         f"({exc})") from None
    parts = attr_path.split(".")
    for part in parts[:-1]:
        try:
            owner = getattr(owner, part)
        except AttributeError:
            raise UsageError(f"cannot trace {spec!r}: {module_name} has no {part!r}") from None
    attr = parts[-1]
    raw = owner.__dict__.get(attr) if isinstance(owner, type) else getattr(owner, attr, None)
    if raw is None:
        raise UsageError(f"cannot trace {spec!r}: {attr!r} not found in {module_name}")
    return owner, attr, raw, module_name


def _unwrap(raw: Any) -> tuple[Callable[..., Any], Callable[[Any], Any]]:
    """The plain function inside ``raw`` and how to wrap a replacement the same way."""
    if isinstance(raw, staticmethod):
        return raw.__func__, staticmethod
    if isinstance(raw, classmethod):
        return raw.__func__, classmethod
    if inspect.isfunction(raw) or inspect.isbuiltin(raw) or callable(raw):
        return raw, lambda f: f
    raise UsageError(f"cannot trace {raw!r}: it is not a function")


def trace_function(rec: RecorderSurface, spec: str, *,
                   name: str | None = None) -> tuple[TraceInfo, Callable[[], None]]:
    """Patch the function named by ``spec`` to record its tensor arguments and results.

    ``TraceInfo.counts`` says how often it was called and how many tensors it gave: a
    function that takes and returns no tensors (dataclasses, None) records nothing."""
    from .tensors import leaves

    counts = {"calls": 0, "tensors": 0}

    def wrap(func: Callable[..., Any], record_name: str) -> Callable[..., Any]:
        try:
            signature: inspect.Signature | None = inspect.signature(func)
        except (TypeError, ValueError):
            signature = None

        @functools.wraps(func)
        @eager  # plain Python in compiled code: func runs eagerly within it
        def traced(*args: Any, **kwargs: Any) -> Any:
            named: dict[str, Any]
            try:
                bound = signature.bind(*args, **kwargs) if signature else None
            except TypeError:
                bound = None
            if bound is not None:
                named = dict(bound.arguments)
            else:
                named = {str(i): a for i, a in enumerate(args)}
                named.update(kwargs)
            named.pop("self", None)
            named.pop("cls", None)
            counts["calls"] += 1
            counts["tensors"] += sum(1 for _ in leaves(named))
            rec.capture(record_name, {"arg": named}, role="arg", strict=False)
            result = func(*args, **kwargs)
            counts["tensors"] += sum(1 for _ in leaves(result))
            rec.capture(record_name, result, role="return", strict=False)
            return result

        return traced

    info, undo = patch_function(spec, wrap, name=name)
    return replace(info, counts=counts), undo


def step_at(rec: RecorderSurface, spec: str) -> tuple[TraceInfo, Callable[[], None]]:
    """Patch the function named by ``spec`` so that each call starts a step
    (``Recorder.step``): the first call step 0, each later call the next step."""

    def wrap(func: Callable[..., Any], record_name: str) -> Callable[..., Any]:
        @functools.wraps(func)
        @eager
        def stepping(*args: Any, **kwargs: Any) -> Any:
            rec.step()
            return func(*args, **kwargs)

        return stepping

    return patch_function(spec, wrap)


def patch_function(spec: str, wrap: Callable[[Callable[..., Any], str], Callable[..., Any]], *,
                   name: str | None = None) -> tuple[TraceInfo, Callable[[], None]]:
    """Replace the function named by ``spec`` with ``wrap(function, record name)`` at its
    definition and in every module that imported it by name."""
    owner, attr, raw, module_name = resolve(spec)
    func, rewrap = _unwrap(raw)
    qual = getattr(func, "__qualname__", attr)
    record_name = name or f"{getattr(func, '__module__', module_name)}.{qual}"
    traced = wrap(func, record_name)

    replacement = rewrap(traced)
    restores: list[tuple[Any, str, Any]] = [(owner, attr, raw)]
    setattr(owner, attr, replacement)
    patched = [f"{module_name}:{qual}"]
    if not isinstance(owner, type):
        # callers that did `from module import func` hold their own reference: patch those too
        for mod_name, mod in list(sys.modules.items()):
            namespace = getattr(mod, "__dict__", None)
            if mod is owner or not isinstance(namespace, dict):
                continue
            for key, value in list(namespace.items()):
                if value is func:
                    restores.append((mod, key, value))
                    setattr(mod, key, replacement)
                    patched.append(f"{mod_name}.{key}")
    code = getattr(func, "__code__", None)
    info = TraceInfo(spec=spec, name=record_name,
                     file=code.co_filename if code else "<built-in>",
                     line=code.co_firstlineno if code else 0, patched=tuple(patched))

    def undo() -> None:
        for target, key, value in reversed(restores):
            setattr(target, key, value)

    return info, undo
