"""The recorder's public surface: what every adapter (module hooks, traces, engines) calls.

An adapter records through four calls and nothing else, the shape TransformerLens gives its
hooks:

* ``capture(name, value, **fields)``: record a tensor (or a tuple/dict of them);
* ``wants(name)``: whether the recording's include/exclude patterns keep ``name`` (ask before
  paying for a copy; ``selective`` is False when no patterns were given);
* ``step()``: start a step; as a context manager (``with rec.step(): forward()``) its body is
  one step, and steps entered inside it (a watched root's call, another ``rec.step()``) do not
  advance;
* ``add_undo(fn)``: have ``fn`` run when the recording closes, also when it raised (every
  hook and patch an adapter installs), or earlier through the function it returns.

``Recorder`` (capture/recorder.py) implements it; this module holds only the protocol and the
``Step`` handle, so that the adapter modules need not import the recorder.
"""

from __future__ import annotations

from types import TracebackType
from typing import Any, Callable, Protocol

__all__ = ["Step", "RecorderSurface"]


class Step(int):
    """The step now open (an int), and a context manager that makes a block one step.

    ``rec.step()`` has already started the step when it returns; ``with`` adds only the
    scope: while it is open, nested step entries do not advance, and leaving the outermost
    scope ends the step (it is flushed to disk; the next capture or step opens the next one).
    """

    _enter: Callable[[], None]
    _leave: Callable[[], None]

    def __new__(cls, step: int, enter: Callable[[], None], leave: Callable[[], None]) -> Step:
        self = super().__new__(cls, step)
        self._enter = enter
        self._leave = leave
        return self

    def __enter__(self) -> Step:
        self._enter()
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self._leave()


class RecorderSurface(Protocol):
    """What an adapter may call on a recorder (see the module docstring)."""

    current_step: int  #: the step that captures go to now

    @property
    def in_step(self) -> bool: ...

    @property
    def selective(self) -> bool: ...

    def capture(self, name: str, value: Any, *, role: str | None = None, strict: bool = True,
                opens_step: bool = True, **fields: Any) -> None: ...

    def capture_output(self, name: str, value: Any) -> None: ...

    def wants(self, name: str) -> bool: ...

    def step(self, *, root: Any = None) -> Step: ...

    def add_undo(self, fn: Callable[[], Any]) -> Callable[[], None]: ...
