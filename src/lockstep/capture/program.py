"""Capturing an unmodified Python program: ``lockstep run --out DIR -- python prog.py``.

The program runs in this process, as ``__main__``, inside a recording. Modules are found as
they are called: the outermost module called when no watched module is running becomes a
watched root (or only instances of the classes given with ``--watch``), so a program that
builds its model however it likes is captured with no edits.
"""

from __future__ import annotations

import os
import runpy
import sys
from typing import Any, Iterable, Sequence

from ..errors import UsageError
from .modules import watch_module
from .recorder import Recorder, record
from .tracing import resolve

__all__ = ["run_program", "split_command"]

_PYTHONS = {"python", "python3", os.path.basename(sys.executable)}


def split_command(argv: Sequence[str]) -> tuple[str, str, list[str]]:
    """``python prog.py a b`` or ``prog.py a b`` or ``python -m pkg a`` ->
    (kind "path"/"module", target, sys.argv for the program)."""
    args = list(argv)
    if args and (os.path.basename(args[0]) in _PYTHONS or args[0] == sys.executable):
        args = args[1:]
    if not args:
        raise UsageError("no program given: use lockstep run --out DIR -- python program.py")
    if args[0] == "-m":
        if len(args) < 2:
            raise UsageError("-m needs a module name")
        return "module", args[1], [args[1], *args[2:]]
    if args[0].startswith("-"):
        raise UsageError(f"python option {args[0]!r} is not supported by lockstep run")
    if not os.path.isfile(args[0]):
        raise UsageError(f"program {args[0]!r} not found")
    return "path", args[0], args


def _watch_classes(specs: Sequence[str]) -> tuple[type, ...]:
    classes = []
    for spec in specs:
        owner, attr, cls, _ = resolve(spec)
        if not isinstance(cls, type):
            raise UsageError(f"--watch {spec!r} is not a class")
        classes.append(cls)
    return tuple(classes)


def _auto_watch(rec: Recorder, classes: tuple[type, ...]) -> Any:
    """A global forward pre-hook that watches each top-level module as it is first called."""
    try:
        import torch
    except ImportError:
        return None
    watched: set[int] = set()
    roots = 0

    def pre_hook(module: Any, args: Any) -> None:
        nonlocal roots
        if rec.in_step or id(module) in watched:
            return
        if classes and not isinstance(module, classes):
            return
        prefix = "" if roots == 0 else f"{type(module).__name__}#{roots}"
        roots += 1
        watched.update(id(m) for m in module.modules())
        # its own pre-hook is registered too late for this call: enter its step now
        rec.add_undo(watch_module(rec, module, prefix=prefix, inputs=False,
                                  selected=rec.wants, called=True))

    return torch.nn.modules.module.register_module_forward_pre_hook(pre_hook)


def _say_empty(rec: Recorder, announce: Any) -> None:
    """Warn about each traced function that ran and recorded nothing, in the output and in
    the dump's meta."""
    empty = rec.traced_empty()
    for info in empty:
        assert info.counts is not None
        announce(f"lockstep: warning: {info.spec} ran {info.counts['calls']} times and recorded "
                 "no tensor: its arguments and return value hold none (None, numbers, objects "
                 "other than tuples, lists, dicts and dataclasses); trace the functions that "
                 "take or return the tensors, or lockstep.probe them inside it")
    if empty:
        rec.add_meta(traced_without_tensors=[info.spec for info in empty])


def run_program(argv: Sequence[str], out: str, *, watch: Sequence[str] = (),
                trace: Sequence[str] = (), include: Sequence[str] | None = None,
                exclude: Sequence[str] | None = None, data: bool = True,
                overwrite: bool = False, announce: Any = print,
                step_at: Sequence[str] = (), layers: Iterable[int] | None = None) -> int:
    """Run a Python program under a recording; returns its exit code. ``include``,
    ``exclude``, ``layers``: which records to keep (``lockstep.record``).

    ``step_at``: functions ("pkg.mod:func") each call of which starts a step. A traced
    function that ran and recorded no tensor is announced as a warning and listed in the
    dump's meta (``traced_without_tensors``)."""
    kind, target, program_argv = split_command(argv)
    meta = {"engine": "python", "program": " ".join(argv)}
    saved_argv, saved_path = sys.argv[:], sys.path[:]
    code = 0
    with record(out, meta=meta, data=data, include=include, exclude=exclude,
                overwrite=overwrite, layers=layers) as rec:
        # the program's own sys.path first: what it imports is what we trace
        sys.argv = program_argv
        if kind == "path":
            sys.path.insert(0, os.path.dirname(os.path.abspath(target)))
        else:
            sys.path.insert(0, os.getcwd())
        hook = None
        try:
            for spec in step_at:
                info = rec.step_at(spec)
                announce(f"lockstep: a step starts at each call of {spec} "
                         f"({info.file}:{info.line})")
            for spec in trace:
                announce(f"lockstep: {rec.trace(spec)}")
            hook = _auto_watch(rec, _watch_classes(watch))
            if kind == "path":
                runpy.run_path(target, run_name="__main__")
            else:
                runpy.run_module(target, run_name="__main__", alter_sys=True)
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
            if code:
                rec.add_meta(exit_code=code)
        finally:
            if hook is not None:
                hook.remove()
            sys.argv, sys.path[:] = saved_argv, saved_path
            _say_empty(rec, announce)
    return code
