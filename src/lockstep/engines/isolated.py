"""An engine run in a child process, so that a crash in native code is one clear error.

``open_engine`` wraps every engine whose class says ``native = True`` (llama.cpp) in an
``IsolatedEngine`` unless it is given ``isolate=False``. The wrapper is an ordinary ``Engine``
to its callers: ``tokenize``, ``decode_logits``, ``detokenize``, ``chat_tokens`` and ``meta``
are forwarded to the child, and ``record_run`` has the child record straight into the dump
(the tensors never cross the pipe, so capture costs what it costs in process).

When the child dies of a signal (SIGSEGV, SIGILL, SIGABRT...) or exits, the call raises
``EngineCrashed`` (a ``LockstepError``: one line, exit code 2), naming the signal and the step
being recorded. What the child had flushed (every step before that one) stays in the dump,
which is marked with the crash (a ``crashed`` metadata line; the dump has no end line, so it
reads as incomplete).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Sequence

import numpy as np

from .. import errors
from ..errors import LockstepError, UsageError
from .base import Engine
from .worker import Channel

if TYPE_CHECKING:
    from ..capture.recorder import Recorder

__all__ = ["EngineCrashed", "IsolatedEngine", "describe_exit", "open_isolated"]


class EngineCrashed(LockstepError):
    """The engine's process died (a signal or an unexpected exit) in the middle of a call."""

    def __init__(self, message: str, *, signal_name: str | None, step: int | None,
                 dump: str | None) -> None:
        super().__init__(message)
        self.signal_name = signal_name
        self.step = step
        self.dump = dump


def describe_exit(returncode: int | None) -> tuple[str, str | None]:
    """(how the process ended, in words; the signal's name or None)."""
    if returncode is None:
        return "stopped answering", None
    if returncode < 0:
        try:
            name = signal.Signals(-returncode).name
        except ValueError:
            name = f"signal {-returncode}"
        return f"crashed ({name})", name
    return f"exited with code {returncode}", None


def _worker_command(rfd: int, wfd: int) -> list[str]:
    """``python -c``, with this very lockstep package first on the path (an installed copy of
    another version never answers for this one), and the current directory off it."""
    root = str(Path(__file__).resolve().parents[2])
    code = ("import sys; sys.path[0:1] = [sys.argv[1]]; "
            "from lockstep.engines.worker import serve; "
            "sys.exit(serve(int(sys.argv[2]), int(sys.argv[3])))")
    return [sys.executable, "-c", code, root, str(rfd), str(wfd)]


class IsolatedEngine(Engine):
    """``engine`` (constructed, not loaded) run in a child process."""

    def __init__(self, engine: Engine, options: dict[str, Any]) -> None:
        super().__init__(engine.spec)
        self.name = engine.name
        self.native = engine.native
        self.options = options
        self._proc: subprocess.Popen[bytes] | None = None
        self._chan: Channel | None = None
        self._meta: dict[str, Any] | None = None
        self.step: int | None = None  #: the step the child said it is recording

    # -- the child -------------------------------------------------------------------------
    def load(self) -> None:
        if self._proc is not None:
            return
        to_child, from_parent = os.pipe()
        to_parent, from_child = os.pipe()
        child_r, child_w = to_child, from_child
        try:
            self._proc = subprocess.Popen(_worker_command(child_r, child_w),
                                          pass_fds=(child_r, child_w),
                                          stdin=subprocess.DEVNULL)
        except OSError as exc:
            for fd in (to_child, from_parent, to_parent, from_child):
                os.close(fd)
            raise LockstepError(f"{self.spec}: cannot start the engine's process: {exc}") \
                from None
        os.close(child_r)
        os.close(child_w)
        self._chan = Channel(to_parent, from_parent)
        self._call({"op": "load", "spec": self.spec, "options": self.options}, "loading")

    def _crashed(self, doing: str, dump: str | None) -> EngineCrashed:
        proc = self._proc
        code = None
        if proc is not None:
            try:
                code = proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                code = proc.wait()
        self._discard()
        how, sig = describe_exit(code)
        step = self.step
        where = f" at step {step}" if step is not None else f" while {doing}"
        message = f"{self.name} {how}{where} ({self.spec})"
        if dump is not None:
            note = f"{self.name} {how}{where}"
            kept = _note_crash(dump, note)
            message += (f"; the records of the steps before it are kept in {dump} "
                        f"(lockstep show {dump})" if kept else f"; nothing was kept in {dump}")
        if sig == "SIGSEGV" or sig == "SIGILL":
            message += "; run `lockstep doctor` and include its output in a bug report"
        return EngineCrashed(message, signal_name=sig, step=step, dump=dump)

    def _call(self, msg: dict[str, Any], doing: str, *, dump: str | None = None,
              on_step: Callable[[int], Any] | None = None
              ) -> tuple[dict[str, Any], np.ndarray | None]:
        if self._chan is None:
            raise UsageError(f"{self.spec}: load() the engine first")
        try:
            self._chan.send(msg)
        except (BrokenPipeError, OSError):
            raise self._crashed(doing, dump) from None
        while True:
            got = self._chan.recv()
            if got is None:
                raise self._crashed(doing, dump)
            reply, array = got
            if "step" in reply and "ok" not in reply and "error" not in reply:
                self.step = int(reply["step"])
                if on_step is not None:
                    on_step(self.step)
                continue
            break
        if "error" in reply:
            kind = reply.get("kind")
            if kind == "bug":
                raise RuntimeError(f"{reply['error']} (in the {self.name} engine's process)\n"
                                   f"{reply.get('traceback', '')}")
            cls = getattr(errors, str(kind), LockstepError)
            if not (isinstance(cls, type) and issubclass(cls, LockstepError)) \
                    or cls in (errors.DumpError, errors.MissingExtraError):
                cls = LockstepError  # constructors with other arguments: the message is enough
            raise cls(reply["error"])
        return reply, array

    def _discard(self) -> None:
        if self._chan is not None:
            self._chan.close()
        self._chan = None
        self._proc = None
        self._meta = None

    def close(self) -> None:
        proc = self._proc
        if proc is None:
            return
        try:
            self._call({"op": "close"}, "closing")
        except LockstepError:
            pass  # it had already gone: nothing left to release
        self._discard()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()

    def __del__(self) -> None:
        proc = self._proc
        if proc is not None and proc.poll() is None:
            proc.kill()

    # -- the engine ------------------------------------------------------------------------
    def meta(self) -> dict[str, Any]:
        if self._meta is None:
            if self._chan is None:
                return super().meta()
            self._meta = dict(self._call({"op": "meta"}, "reading its metadata")[0]["meta"])
        return {**self._meta, "process": "isolated"}

    def tokenize(self, text: str) -> list[int]:
        reply = self._call({"op": "tokenize", "text": text}, "tokenizing")[0]
        return [int(i) for i in reply["ids"]]

    def detokenize(self, ids: Sequence[int], *, skip_special: bool = False) -> str | None:
        reply, _ = self._call({"op": "detokenize", "ids": [int(i) for i in ids],
                               "skip_special": skip_special}, "detokenizing")
        return reply["text"]

    def chat_tokens(self, messages: list[dict[str, str]]) -> list[int]:
        reply, _ = self._call({"op": "chat_tokens", "messages": messages},
                              "applying the chat template")
        return [int(i) for i in reply["ids"]]

    def decode_logits(self, prompt_ids: Sequence[int], steps: int, *,
                      forced: Sequence[int] | None = None) -> tuple[list[int], np.ndarray]:
        self.step = None
        reply, rows = self._call({"op": "decode_logits", "ids": [int(i) for i in prompt_ids],
                                  "steps": int(steps),
                                  "forced": None if forced is None else [int(t) for t in forced]},
                                 "decoding")
        assert rows is not None
        return [int(t) for t in reply["chosen"]], rows

    def step_times(self, prompt_ids: Sequence[int], steps: int) -> list[float]:
        reply, _ = self._call({"op": "step_times", "ids": [int(i) for i in prompt_ids],
                               "steps": int(steps)}, "timing")
        return [float(t) for t in reply["times"]]

    def max_positions(self) -> int | None:
        return self._call({"op": "max_positions"}, "reading its context")[0]["n"]

    def peak_memory(self) -> dict[str, Any]:
        """The engine's process's peak memory (see ``bench.memory``)."""
        return dict(self._call({"op": "peak_memory"}, "reading its memory")[0]["memory"])

    def module_times(self, prompt_ids: Sequence[int], steps: int, *, iters: int,
                     warmup: int) -> dict[str, Any]:
        """``bench.modules.module_times`` run in the engine's process."""
        reply, _ = self._call({"op": "module_times", "ids": [int(i) for i in prompt_ids],
                               "steps": int(steps), "iters": int(iters),
                               "warmup": int(warmup)}, "timing its modules")
        return dict(reply["modules"])

    def generate(self, rec: Recorder, prompt_ids: Sequence[int], decode: int, *,
                 forced: Sequence[int] | None = None) -> list[int]:
        raise UsageError(f"{self.spec}: the {self.name} engine runs in its own process and "
                         "records into a dump of its own: use record_run(), or open it with "
                         "isolate=False to record into this process's recorder")

    def record_run(self, out: str | os.PathLike[str], meta: dict[str, Any],
                   prompt_ids: Sequence[int], decode: int, *,
                   forced: Sequence[int] | None = None, data: bool | str = True,
                   overwrite: bool = False, include: Sequence[str] | None = None,
                   on_step: Callable[[int], Any] | None = None,
                   exclude: Sequence[str] | None = None,
                   layers: Sequence[int] | None = None) -> list[int]:
        self.step = None
        out = os.fspath(out)
        reply, _ = self._call({"op": "record", "out": os.path.abspath(out), "meta": meta,
                               "ids": [int(i) for i in prompt_ids], "decode": int(decode),
                               "forced": None if forced is None else [int(t) for t in forced],
                               "data": data, "overwrite": overwrite,
                               "include": None if include is None else list(include),
                               "exclude": None if exclude is None else list(exclude),
                               "layers": None if layers is None else [int(i) for i in layers]},
                              "recording", dump=out, on_step=on_step)
        return [int(t) for t in reply["chosen"]]


def _note_crash(dump: str, note: str) -> bool:
    """Mark a dump whose writer died: a ``crashed`` metadata line after its last whole line.
    Returns whether the dump exists (with its header) to be marked."""
    from ..store.writer import append_meta

    try:
        return append_meta(dump, crashed=note)
    except OSError:
        return False


def open_isolated(spec: str, **options: Any) -> IsolatedEngine:
    """Any engine (not only a native one) in a process of its own: for benchmarks, where
    each engine's peak memory is its own process's and neither slows the other."""
    from .registry import construct

    return IsolatedEngine(construct(spec, **options), options)
