"""The recorder: one active dump, the current step, and every way of capturing into it.

``record(path)`` opens a dump and makes its recorder the active one (so that ``probe`` finds
it); on exit every hook and patch it installed is removed, also when the body raised.
"""

from __future__ import annotations

import os
import platform
import sys
import time
import weakref
from contextlib import contextmanager
from typing import Any, Callable, Iterable, Iterator, Sequence

from .._version import __version__
from ..display import safe
from ..errors import UsageError
from ..store.sizing import SIZES, SizingWriter
from ..store.writer import DumpWriter, check_name
from .copies import check_mode
from .eager import eager
from .ranks import distributed_rank, rank_path, shard_field
from .selection import Selection
from .sink import Sink
from .surface import Step
from .tensors import Unrecordable, leaves, plain_cpu, to_host

__all__ = ["Recorder", "record", "probe", "active"]

_ACTIVE: Recorder | None = None
_SKIPPED_KEPT = 50  # distinct skipped records listed in the dump's metadata
_NO_FIELDS: dict[str, Any] = {}  # (never changed)


class _NoTensor:
    pass


_TENSOR: Any = None  # torch.Tensor, once torch is imported


def _tensor_type() -> Any:
    """torch.Tensor, or a type nothing is when torch was never imported."""
    global _TENSOR
    torch = sys.modules.get("torch")
    if torch is None:
        return _NoTensor
    _TENSOR = torch.Tensor
    return _TENSOR


def _warn(line: str) -> None:
    sys.stderr.write(line + "\n")
    sys.stderr.flush()


def active() -> Recorder | None:
    """The recorder that ``probe`` writes to, or None."""
    return _ACTIVE


def probe(name: str, value: Any, *, shard: tuple[str, int] | None = None) -> Any:
    """Record ``value`` (a tensor, or a tuple/dict of them) as ``name`` at the current step.

    Returns ``value`` unchanged, so it can wrap an expression. Costs one global lookup when
    nothing is recording. The recording's include/exclude patterns apply to ``name``.
    ``shard`` (tensor-parallel runs): how the ranks' records of ``name`` merge, ``("col",
    dim)`` (concatenated on ``dim``), ``("row", 0)`` (partial sums) or ``("replicated",
    0)``; stored as the record's ``shard`` field (docs/format.md "Ranks").
    """
    if _ACTIVE is not None:
        _eager_probe()(name, value, shard)
    return value


def _probe(name: str, value: Any, shard: tuple[str, int] | None) -> None:
    rec = _ACTIVE
    if rec is not None and rec.wants(name):
        if shard is None:
            rec.capture(name, value, role="probe", strict=False)
        else:
            rec.capture(name, value, role="probe", strict=False, shard=shard_field(shard))


_EAGER_PROBE: Any = None


def _eager_probe() -> Any:
    """``_probe`` run as plain Python inside torch.compile'd code (capture/eager.py), made
    once torch is imported."""
    global _EAGER_PROBE
    if _EAGER_PROBE is None:
        if "torch" not in sys.modules:
            return _probe
        _EAGER_PROBE = eager(_probe)
    return _EAGER_PROBE


class Recorder:
    """Captures tensors into one dump. Made by ``record``; see its docstring.

    Adapters (module hooks, traces, engines) use only its public surface
    (``capture.surface``): ``capture``, ``wants``, ``step`` and ``add_undo``.
    """

    def __init__(self, path: str | os.PathLike[str], *, meta: dict[str, Any] | None = None,
                 data: bool | str = True, include: Sequence[str] | None = None,
                 exclude: Sequence[str] | None = None, overwrite: bool = False,
                 stats: bool = False, max_pending_bytes: int = 1 << 30,
                 layers: Iterable[int] | None = None, max_pending_records: int = 4096,
                 copies: str = "auto") -> None:
        header = {"lockstep_version": __version__, "created": time.time(),
                  "host": platform.node(), "stats_only": not data}
        header.update(meta or {})
        check_mode(copies)
        self.path = os.fspath(path)
        writer = (SizingWriter if data == SIZES else DumpWriter)(path, header,
                                                                 overwrite=overwrite)
        self._sink = Sink(writer, keep_data=bool(data), keep_stats=stats,
                          max_pending_bytes=max_pending_bytes,
                          max_pending_records=max_pending_records, copies=copies)
        self.selected = Selection(include, exclude, layers)
        self.current_step = 0  #: the step that captures go to now
        self._ended = False  # the step ended: the next capture or step entry opens a new one
        self._calls: dict[str, int] = {}  # name -> calls recorded in this step
        self._names: set[str] = set()  # record names already checked
        # id -> (weakref, version, HostTensor or, written at once, (dtype, shape, offset))
        self._seen: dict[int, tuple[Any, Any, Any]] = {}
        self._depth = 0  # step scopes open now (watched roots in their call, ``with step()``)
        self._step_root: int | None = None  # id of the root whose calls start steps
        self._undo: list[Callable[[], None]] = []
        self._closed = False
        self.traced: list[Any] = []  #: TraceInfo of every function traced
        #: records skipped because a dump cannot hold them (first few, distinct names)
        self.skipped: list[dict[str, Any]] = []
        self.skipped_count = 0
        self._warned = False
        #: called with the new step each time one opens (a worker process tells its parent)
        self.on_step: Callable[[int], Any] | None = None

    # -- steps -------------------------------------------------------------------------------
    # One step model for every engine. A step ENDS when the outermost step scope is left (a
    # watched root's top-level call returns, the body of ``with rec.step()`` ends), at a
    # top-level ``step()`` when the step holds records, or at ``next_step()``. After a step
    # ended, the next capture or step entry OPENS the next one, so inputs captured before a
    # call land in that call's step. Step entries inside an open scope never advance.
    def step(self, *, root: Any = None) -> Step:
        """Start a step; returns it (an int) as a context manager for the step's scope.

        Plain calls: the first call (before anything is recorded) starts step 0, each later
        call the next step. For engines with no watched module tree, call it at the start of
        every forward (prefill, then each decode step); ``lockstep run --step-at
        pkg.mod:func`` calls it at each call of ``func``. ``with rec.step(): forward()``
        also ends the step when the block is left (it is on disk then), and keeps every step
        entry inside the block (another ``rec.step()``, a watched root's call) in this step.

        ``root``: the step is a call of ``root``, a watched module (what ``watch``'s hooks
        pass) or an engine's forward (llama.cpp's adapter passes itself): it keeps the
        captures made since the last step ended (the inputs given to the call), and only the
        first root called starts steps; another root called between two of its calls (a
        sampler, a separate lm_head) records into the step it follows.
        """
        if root is not None:
            if self._step_root is None:
                self._step_root = id(root)
            if self._depth == 0 and self._ended and id(root) == self._step_root:
                self._open_step(self.current_step + 1)
        elif self._depth == 0:
            if self._calls or self._ended:  # the current step holds records
                self.next_step()
            else:
                self.flush()
        return Step(self.current_step, self._enter, self._leave)

    def next_step(self, step: int | None = None) -> int:
        """End the current step: later captures go to ``step`` (default: the next one).

        Everything captured so far is flushed to disk first.
        """
        self.flush()
        new = self.current_step + 1 if step is None else int(step)
        if new < self.current_step:
            raise UsageError(f"steps only go forward: asked for step {new} after step "
                             f"{self.current_step}")
        self._open_step(new)
        return self.current_step

    @property
    def in_step(self) -> bool:
        """Inside a step scope: a watched root's call or a ``with rec.step()`` block."""
        return self._depth > 0

    def step_at(self, spec: str) -> Any:
        """Start a step (``step``) at each call of the function ``"pkg.mod:func"``, patched
        wherever it was imported by name. Returns a TraceInfo."""
        from .tracing import step_at

        info, undo = step_at(self, spec)
        self.add_undo(undo)
        return info

    def _open_step(self, step: int) -> None:
        if step != self.current_step:
            self.current_step = step
            self._calls.clear()
            if self.on_step is not None:
                self.on_step(step)
        self._seen.clear()
        self._ended = False

    def _enter(self) -> None:
        self._depth += 1

    def _leave(self) -> None:
        self._depth = max(0, self._depth - 1)
        if self._depth == 0:
            self.flush()  # a finished step is on disk before the engine goes on
            self._ended = True

    # -- capture -----------------------------------------------------------------------------
    def capture(self, name: str, value: Any, *, role: str | None = None, strict: bool = True,
                opens_step: bool = True, **fields: Any) -> None:
        """Record every tensor in ``value`` as ``name`` (or ``name:field`` for nested ones).

        ``fields`` (JSON values, e.g. ``op="rope"``) are stored in each record. A tensor
        a dump cannot hold (an unknown dtype, a meta-device tensor, a name that is not text)
        raises a UsageError naming the record; with ``strict=False`` (hooks, traces and
        probes: the recorded program must never fail because of the recorder) it is skipped
        instead, noted in the dump's ``skipped`` metadata and reported once on stderr.
        ``opens_step=False`` keeps a capture made after a step's root call returned in that
        step (the hooks of watched modules called outside the root pass it)."""
        if self._closed:
            raise UsageError(f"cannot record {name!r}: the recording at {self.path} is closed")
        # a capture after a step's root returned opens the next step (inputs probed before
        # a call), but a watched module's there (``opens_step=False``: compute_logits, a
        # sampler) belongs to the step it follows
        if self._ended and self._depth == 0 and opens_step:
            self._open_step(self.current_step + 1)
        if name not in self._names:  # names are checked once: this runs per capture
            try:
                check_name(name)
            except UsageError as exc:
                return self._refuse(name, str(exc), strict)
            self._names.add(name)
        if type(value) is (_TENSOR or _tensor_type()):  # the common case: one bare tensor
            self._capture_one(name, value, role, strict, fields)
            return
        for suffix, tensor in leaves(value):
            full = f"{name}:{suffix}" if suffix else name
            if full not in self._names:
                try:
                    check_name(full)  # a dict key of the output may be the one that is not text
                except UsageError as exc:
                    self._refuse(full, str(exc), strict)
                    continue
                self._names.add(full)
            self._capture_one(full, tensor, role, strict, fields)

    def capture_output(self, name: str, value: Any) -> None:
        """A watched module's output: ``capture(name, value, role="output",
        opens_step=False, strict=False)``, with the common case (a bare tensor under a name
        already checked) one call shorter: module hooks run it hundreds of times a forward."""
        if type(value) is _TENSOR and name in self._names and not self._closed:
            self._capture_one(name, value, "output", False, _NO_FIELDS)
        else:
            self.capture(name, value, role="output", opens_step=False, strict=False)

    def _capture_one(self, full: str, tensor: Any, role: str | None, strict: bool,
                     extra: dict[str, Any]) -> None:
        calls = self._calls
        call = calls[full] = calls.get(full, 0) + 1
        call -= 1
        # A parent module often returns its child's output object itself (mlp returns
        # down_proj's tensor): record it again as a pointer to the data already written.
        # Identity plus the in-place version counter, never the data address: freed
        # buffers are reused by later tensors.
        # (numpy arrays have no version counter: never aliased)
        version = getattr(tensor, "_version", None)
        if version is not None:
            seen = self._seen.get(id(tensor))
            if seen is not None and seen[0]() is tensor and seen[1] == version:
                host = seen[2]
                if type(host) is tuple:  # written by the fast lane below: (dtype, shape, offset)
                    host = self._sink.written(*host)
                self._sink.put(full, self.current_step, call, host, alias=True,
                               role=role, **extra)
                return
            sink = self._sink
            # the common capture first: a bare CPU tensor, written now (a subclass's
            # storage may not be its own: those go through to_host)
            if sink.writes_now and type(tensor) is _TENSOR:
                plain = plain_cpu(tensor)
                if plain is not None:
                    dtype, shape, data = plain
                    offset = sink.write_now(full, self.current_step, call, dtype, shape, data,
                                            role, extra)
                    self._seen[id(tensor)] = (weakref.ref(tensor), version,
                                              (dtype, shape, offset))
                    return
        try:
            host = to_host(tensor, copy=not self._sink.direct, engine=self._sink.copies)
        except Unrecordable as exc:
            self._refuse(full, f"cannot record {full!r}: {exc}", strict)
            return
        except Exception as exc:  # whatever a tensor subclass raises on its way to the host
            if strict:
                raise
            self._refuse(full, f"cannot record {full!r}: {type(exc).__name__}: {exc}",
                         strict)
            return
        if version is not None:
            self._seen[id(tensor)] = (weakref.ref(tensor), version, host)
        self._sink.put(full, self.current_step, call, host, role=role, **extra)

    def _refuse(self, name: str, why: str, strict: bool) -> None:
        """A record that cannot be made: raise, or (not strict) skip it, note it in the dump
        and say so once."""
        if strict:
            raise UsageError(why)
        self.skipped_count += 1
        if len(self.skipped) < _SKIPPED_KEPT and all(s["name"] != safe(name, 200)
                                                     for s in self.skipped):
            self.skipped.append({"name": safe(name, 200), "step": self.current_step,
                                 "why": safe(why, 300)})
            self._sink.meta(skipped=self._skipped_meta())
        if not self._warned:
            self._warned = True
            _warn(f"lockstep: warning: {safe(why, 300)}; skipped (each record skipped is "
                  f"listed in the dump's 'skipped' metadata of {safe(self.path)})")

    def _skipped_meta(self) -> dict[str, Any]:
        return {"count": self.skipped_count, "records": list(self.skipped)}

    def wants(self, name: str) -> bool:
        """Whether the recording keeps records named ``name`` (its include/exclude globs).

        ``capture`` records whatever it is given; an adapter asks this first to skip the
        copy of a tensor the user left out (module hooks, llama.cpp's graph nodes, probes).
        """
        return self.selected(name)

    @property
    def selective(self) -> bool:
        """Include/exclude patterns were given: ``wants`` can say no (else it never does)."""
        return self.selected.selective

    def add_undo(self, fn: Callable[[], Any]) -> Callable[[], None]:
        """Run ``fn`` when the recording closes, also when its body raised: every hook and
        patch an adapter installs is removed this way, the last added first.

        Returns a function that runs ``fn`` at once instead (once; later calls and the close
        do nothing), for an adapter that unpatches at the end of its own run.
        """
        done = False

        def undo() -> None:
            nonlocal done
            if done:
                return
            done = True
            if undo in self._undo:
                self._undo.remove(undo)
            fn()

        self._undo.append(undo)
        return undo

    def watch(self, module: Any, *, prefix: str = "", inputs: bool | Sequence[str] = False,
              include: Sequence[str] | None = None,
              exclude: Sequence[str] | None = None) -> None:
        """Record the output of ``module`` and of every submodule, named as
        ``named_modules()`` names them (the root is ``""``, or ``prefix``).

        Each top-level call of ``module`` starts a new step. ``inputs=True`` also records
        each module's tensor arguments as ``name:input.0``, ``name:input.<kwarg>``; a list of
        glob patterns records the inputs of the modules whose names match.
        """
        from .modules import watch_module

        patterns = Selection(include, exclude, self.selected.layers) if (include or exclude) \
            else self.wants if self.selective else None
        self.add_undo(watch_module(self, module, prefix=prefix, inputs=inputs,
                                   selected=patterns))

    def trace(self, spec: str, *, name: str | None = None) -> Any:
        """Record the arguments and return value of a Python function, given as
        ``"pkg.mod:func"`` or ``"pkg.mod:Class.method"``; every module that imported the
        function by name is patched too. Returns a TraceInfo saying which copy was traced.
        """
        from .tracing import trace_function

        info, undo = trace_function(self, spec, name=name)
        self.add_undo(undo)
        self.traced.append(info)
        self._sink.meta(traced=[t.as_dict() for t in self.traced])
        return info

    def traced_empty(self) -> list[Any]:
        """The traced functions that were called and recorded no tensor; the dump's
        ``traced`` meta is brought up to date with every traced function's counts."""
        if self.traced and not self._closed:
            self._sink.meta(traced=[t.as_dict() for t in self.traced])
        return [t for t in self.traced if t.empty]

    def add_meta(self, **meta: Any) -> None:
        """Add run metadata (engine, model, dtype, prompt_token_ids, ...) to the dump."""
        self._sink.meta(**meta)

    def flush(self) -> None:
        """Wait until everything captured so far is written to disk."""
        self._sink.flush()

    def close(self, error: str | None = None) -> None:
        """Remove every hook and patch, finish writing, and mark the dump complete."""
        if self._closed:
            return
        self._closed = True
        global _ACTIVE
        if _ACTIVE is self:
            _ACTIVE = None
        while self._undo:
            self._undo.pop()()
        if self.skipped_count:
            self._sink.meta(skipped=self._skipped_meta())  # the final count
        self._sink.close(error=error)


@contextmanager
def record(path: str | os.PathLike[str], *, meta: dict[str, Any] | None = None,
           data: bool | str = True, include: Sequence[str] | None = None,
           exclude: Sequence[str] | None = None, overwrite: bool = False,
           stats: bool = False, layers: Iterable[int] | None = None,
           copies: str = "auto") -> Iterator[Recorder]:
    """Record into a new dump directory at ``path``.

    ``data=False`` keeps statistics only (for huge runs). Records that keep their data
    leave their statistics to the reader (``Dump.stats`` computes them from the data), which
    lets each capture be written at once, with one copy; ``stats=True`` computes and stores
    them while recording, on the writer thread. ``include``/``exclude`` are glob patterns
    on names; ``layers`` keeps only the records of these layers (by the first delimited
    integer in a name) and every record of no layer. ``data="sizes"`` writes every record's
    index line but not its data (``capture --dry-run``'s size estimate). The dump is flushed
    at the end of every step and closed on exit; if the body raises, the dump is still
    closed and notes the error. ``copies``: "auto" (CUDA tensors copied on a side stream, no
    host sync per tensor), "queue" (CPU tensors too go through the pooled copies and the
    writer thread) or "sync" (CUDA tensors copied with a blocking copy); every mode writes
    the same bytes (docs/gpu.md).

    Inside an initialized torch.distributed program of more than one process, each rank
    writes its own dump ``path/rank<N>`` and rank 0 a manifest ``path/ranks.json``
    (docs/format.md "Ranks"); ``compare`` merges the ranks.
    """
    global _ACTIVE
    if _ACTIVE is not None:
        raise UsageError(f"already recording to {_ACTIVE.path}; recordings cannot be nested")
    ranked = distributed_rank()  # in a torch.distributed run: one dump per rank
    if ranked is not None:
        path = rank_path(path, *ranked)
        meta = {**(meta or {}), "rank": ranked[0], "world_size": ranked[1]}
    rec = Recorder(path, meta=meta, data=data, include=include, exclude=exclude,
                   overwrite=overwrite, stats=stats, layers=layers, copies=copies)
    _ACTIVE = rec
    try:
        yield rec
    except BaseException as exc:
        rec.close(error=f"{type(exc).__name__}: {exc}")
        raise
    rec.close()
