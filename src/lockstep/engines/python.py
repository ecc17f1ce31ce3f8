"""A user's own engine, written in Python: ``py:package.module:Factory`` or
``py:path/to/file.py:Factory``.

``Factory`` is an ``Engine`` subclass (or any callable returning an ``Engine``); it is called
with the spec string. The engine implements ``load``, ``tokenize`` and ``generate`` (see
engines/base.py): ``generate`` records the prefill as step 0 and one step per decode token,
into the recorder it is given (``rec.watch(model)`` or ``lockstep.probe`` inside).

A file's directory is on ``sys.path`` while the file runs (its own imports work as under
``python file.py``), and taken off again after: import what it needs at its top, not inside
a function called later.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
from pathlib import Path
from typing import Any

from ..errors import UsageError
from .base import Engine

__all__ = ["load_python_engine"]


#: engine files already run in this process, by resolved path and modification: a file is
#: run once, as an import is, however many times its engines are constructed (diff constructs
#: each engine before recording, to say a bad option at once, then again to record); an edited
#: file runs again
_FILES: dict[tuple[Path, int, int], Any] = {}


def _module(where: str) -> Any:
    if where.endswith(".py"):
        path = Path(where)
        if not path.is_file():
            raise UsageError(f"py: engine file {where!r} not found")
        stat = path.stat()
        key = (path.resolve(), stat.st_mtime_ns, stat.st_size)
        known = _FILES.get(key)
        if known is not None:
            return known
        spec = importlib.util.spec_from_file_location(path.stem, path)
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules[path.stem] = module
        saved = list(sys.path)
        sys.path.insert(0, str(path.resolve().parent))  # its own imports, as python file.py
        try:
            spec.loader.exec_module(module)
        finally:
            sys.path[:] = saved
        _FILES[key] = module
        return module
    try:
        return importlib.import_module(where)
    except ImportError as exc:
        raise UsageError(f"py: engine module {where!r} does not import ({exc})") from None


def load_python_engine(spec: str, target: str, **options: Any) -> Engine:
    """The engine a ``py:`` spec names (not yet loaded)."""
    where, sep, name = target.rpartition(":")
    if not sep or not where or not name:
        raise UsageError(f"engine spec {spec!r} should look like 'py:package.module:Factory' "
                         "or 'py:path/to/engine.py:Factory'")
    factory = getattr(_module(where), name, None)
    if factory is None:
        raise UsageError(f"{spec}: {where} has no {name!r}")
    engine = factory(spec, **options)
    if not isinstance(engine, Engine):
        raise UsageError(f"{spec}: {name} gave a {type(engine).__name__}, not a "
                         "lockstep.engines.Engine (subclass it: load, tokenize, generate)")
    return engine
