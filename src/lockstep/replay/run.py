"""The dual test: re-run the reference's ops around a divergence on the candidate's recorded
inputs, to tell the error an op introduces from the error it inherits.

After a comparison, for the first pair over tolerance and a few more over tolerance in the
same step (other layers), the reference engine runs again on the same tokens up to that step
with hooks on just those modules (a targeted second pass: their inputs and outputs, in
memory). For each op:

* its input on the reference side is found among the reference's records by value, and the
  candidate's input is that record's partner (in the reference's layout);
* **introduced**: the candidate's output against the reference op run on the candidate's own
  input; **inherited**: the candidate's input against the reference's; the pair's own error
  is both together;
* **precision**: the reference op run with its operands (input and weights) rounded to
  float16, then bfloat16; an op whose introduced error is no more than twice what a rounding
  gives is explained by operands of that precision.

When the first divergence is explained by a precision, the comparison is made again with the
candidate taken to compute in it (``compute_dtype``): measured, not declared.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np

from ..align.transforms import apply_transform
from ..align.verify import merged_meta
from ..errors import LockstepError
from ..store.reader import Dump
from .ops import ROUNDINGS, module_of, run_op, why_not_replayable

__all__ = ["ReplayOp", "Replay", "replay_comparison", "EXPLAINED_FACTOR", "INTRODUCED_SHARE"]

#: an op's introduced error at most this many times a rounding's is explained by it
EXPLAINED_FACTOR = 2.0
#: an op introduces its error when the introduced part is at least this share of the pair's
INTRODUCED_SHARE = 0.5
_SAME = 1e-5  # a reference record holding an op's input agrees with it to this


@dataclass(frozen=True)
class ReplayOp:
    """One op replayed (or why it was not)."""

    step: int
    reference: str
    candidate: str
    total: float  #: the pair's error: inherited and introduced together
    module: str | None = None
    input_record: str | None = None  #: the reference record that holds the op's input
    input_candidate: str | None = None  #: its candidate partner, fed to the reference op
    introduced: float | None = None  #: candidate vs the reference op on the candidate's input
    inherited: float | None = None  #: the candidate's input vs the reference's
    rounding: dict[str, float] = field(default_factory=dict)  #: dtype -> its error here
    explained_by: str | None = None  #: a precision whose rounding explains the error
    note: str | None = None  #: why it was not replayed

    @property
    def where(self) -> str | None:
        """"introduced" or "inherited" (None when not replayed)."""
        if self.introduced is None:
            return None
        return "introduced" if self.introduced >= INTRODUCED_SHARE * self.total else "inherited"

    def to_json(self) -> dict[str, Any]:
        return {"step": self.step, "reference": self.reference, "candidate": self.candidate,
                "module": self.module, "total": self.total, "introduced": self.introduced,
                "inherited": self.inherited, "where": self.where,
                "input": None if self.input_record is None else
                {"reference": self.input_record, "candidate": self.input_candidate},
                "rounding": self.rounding, "explained_by": self.explained_by,
                "note": self.note}


@dataclass
class Replay:
    """What the dual test measured around a comparison's divergence."""

    ops: list[ReplayOp]
    precision: str | None = None  #: the candidate's measured operand precision, if any
    seconds: float = 0.0

    @property
    def first(self) -> ReplayOp | None:
        return self.ops[0] if self.ops else None

    def to_json(self) -> dict[str, Any]:
        return {"ops": [op.to_json() for op in self.ops], "precision": self.precision,
                "seconds": self.seconds}


def _rel(a: np.ndarray, b: np.ndarray) -> float:
    a64, b64 = a.astype(np.float64).ravel(), b.astype(np.float64).ravel()
    den = float(np.linalg.norm(b64))
    num = float(np.linalg.norm(a64 - b64))
    return num / den if den else (0.0 if num == 0 else float("inf"))


def _trailing(arr: np.ndarray, like: np.ndarray) -> np.ndarray | None:
    """``arr`` as ``like``'s shape: the same, squeezed, or its last positions (an engine that
    computes only the last position's logits); None when neither fits."""
    if arr.shape == like.shape:
        return arr
    if arr.size == like.size:
        return arr.reshape(like.shape)
    a, b = np.squeeze(arr), np.squeeze(like)
    if a.ndim >= 2 and b.ndim >= 1 and a.shape[-1] == b.shape[-1]:
        rows = b.size // b.shape[-1]
        flat = a.reshape(-1, a.shape[-1])
        if rows <= flat.shape[0]:
            return flat[-rows:].reshape(like.shape)
    return None


class _Tap:
    """Inputs and outputs of chosen modules at one step (the root's n-th call)."""

    def __init__(self, root: Any, modules: dict[str, Any], step: int) -> None:
        self.step = step
        self.calls = -1
        self.seen: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        self.extra: dict[str, str] = {}  #: module -> why its call is not one input alone
        self.handles = [root.register_forward_pre_hook(self._count)]
        for name, module in modules.items():
            self.handles.append(module.register_forward_hook(self._keep(name), with_kwargs=True))

    def _count(self, module: Any, args: Any) -> None:
        self.calls += 1

    def _keep(self, name: str) -> Any:
        def hook(module: Any, args: Any, kwargs: Any, output: Any) -> None:
            if self.calls != self.step or name in self.seen or name in self.extra or not args:
                return
            if len(args) != 1 or kwargs:  # rotary embeddings (x, positions=...), masks, ...
                given = len(args) + len(kwargs)
                self.extra[name] = f"called with {given} arguments, not its input alone"
                return
            x = args[0]
            y = output[0] if isinstance(output, (tuple, list)) else output
            if hasattr(x, "detach") and hasattr(y, "detach"):
                self.seen[name] = (x.detach().float().cpu().numpy() if x.is_floating_point()
                                   else x.detach().cpu().numpy(),
                                   y.detach().float().cpu().numpy())
        return hook

    def close(self) -> None:
        for h in self.handles:
            h.remove()


def _targets(comparison: Any, root: Any, max_ops: int, at: Any = None) -> list[Any]:
    """``at``, or the first divergence (or, for drift, the first pair over tolerance), then
    more pairs over tolerance in that step, one per layer, in capture order."""
    first = at or comparison.first_divergence or next(
        (p for p in comparison.results if p.over), None)
    if first is None:
        return []
    chosen, layers = [first], set()
    for p in comparison.results:
        if len(chosen) >= max_ops:
            break
        if p.step != first.step or p.ref_seq <= first.ref_seq or not p.over or p is first:
            continue
        found = module_of(root, p.ref_name)
        if found is None or why_not_replayable(found[1]):
            continue
        layer = next((t for t in p.ref_name.split(".") if t.isdigit()), None)
        if layer in layers:
            continue
        layers.add(layer)
        chosen.append(p)
    return chosen


class _Dumps:
    """Both dumps of a comparison, their records by seq, and a pair's two arrays in the
    reference's layout (as the comparison measured them)."""

    def __init__(self, ref: Dump, cand: Dump) -> None:
        self.ref, self.cand = ref, cand
        self.ref_seq = {r.seq: r for r in ref.records}
        self.cand_seq = {r.seq: r for r in cand.records}
        self.cand_meta = merged_meta(ref, cand)

    def arrays(self, pair: Any) -> tuple[np.ndarray, np.ndarray]:
        r, c = self.ref_seq[pair.ref_seq], self.cand_seq[pair.cand_seq]
        return (apply_transform(pair.ref_transform, self.ref.read(r), self.ref.meta),
                apply_transform(pair.cand_transform, self.cand.read(c), self.cand_meta))


def _input_pair(comparison: Any, dumps: _Dumps, target: Any,
                x_ref: np.ndarray) -> tuple[Any, np.ndarray] | None:
    """The pair whose reference record holds ``x_ref`` (nearest before the target), and
    its candidate array in the reference's layout, shaped as ``x_ref``."""
    earlier = [p for p in comparison.results
               if p.step == target.step and p.ref_seq < target.ref_seq and p.metrics is not None]
    for p in sorted(earlier, key=lambda p: -p.ref_seq):
        try:
            r_arr, c_arr = dumps.arrays(p)
        except LockstepError:
            continue
        r_fit = _trailing(r_arr, x_ref)
        if r_fit is None or r_fit.dtype.kind != x_ref.dtype.kind and x_ref.dtype.kind in "iu":
            continue
        if _rel(r_fit, x_ref) <= _SAME:
            c_fit = _trailing(c_arr, x_ref)
            if c_fit is not None:
                return p, c_fit.astype(x_ref.dtype)
    return None


def replay_comparison(engine: Any, comparison: Any, prompt_ids: Sequence[int],
                      forced: Sequence[int] | None, *, max_ops: int = 6,
                      at: Any = None) -> Replay:
    """Replay around ``comparison``'s divergence (or the pair ``at``) with ``engine`` (the
    reference, loaded, with a torch module tree); see the module docstring."""
    from ..store.reader import open_dump

    t0 = time.perf_counter()
    root = engine.torch_module()
    if root is None:
        return Replay([], seconds=0.0)
    targets = _targets(comparison, root, max_ops, at)
    if not targets:
        return Replay([], seconds=time.perf_counter() - t0)
    step = targets[0].step
    modules: dict[str, Any] = {}
    notes: dict[int, str] = {}
    for i, p in enumerate(targets):
        found = module_of(root, p.ref_name)
        if found is None:
            notes[i] = "not the output of a module of the reference"
            continue
        why = why_not_replayable(found[1])
        if why:
            notes[i] = why
            continue
        modules[found[0]] = found[1]
    seen: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    if modules:
        tap = _Tap(root, modules, step)
        try:
            engine.decode_logits(list(prompt_ids), step + 1, forced=forced)
        finally:
            tap.close()
        seen = tap.seen
        for name, why in tap.extra.items():
            for i, p in enumerate(targets):
                found = module_of(root, p.ref_name)
                if found is not None and found[0] == name:
                    notes[i] = why
    ops: list[ReplayOp] = []
    with open_dump(comparison.reference.path) as ref, open_dump(comparison.candidate.path) as cand:
        dumps = _Dumps(ref, cand)
        for i, p in enumerate(targets):
            base = dict(step=p.step, reference=p.ref_name, candidate=p.cand_name, total=p.error)
            if i in notes:
                ops.append(ReplayOp(**base, note=notes[i]))
                continue
            name, module = module_of(root, p.ref_name)  # type: ignore[misc]
            if name not in seen:
                ops.append(ReplayOp(**base, module=name, note="the module did not run at that "
                                                               "step in the replay"))
                continue
            x_ref, y_ref = seen[name]
            found_input = _input_pair(comparison, dumps, p, x_ref)
            if found_input is None:
                ops.append(ReplayOp(**base, module=name, note="no reference record holds "
                                                               "this op's input"))
                continue
            in_pair, x_cand = found_input
            _, c_arr = dumps.arrays(p)
            y_cand = _trailing(c_arr, y_ref)
            if y_cand is None:
                ops.append(ReplayOp(**base, module=name, note="the output's shape does not fit "
                                                               "the replayed op's"))
                continue
            try:
                y_replay = run_op(module, x_cand)
                rounding: dict[str, float] = {}
                if x_ref.dtype.kind == "f":
                    for dtype in ROUNDINGS:
                        rounding[dtype] = _rel(run_op(module, x_ref, rounding=dtype), y_ref)
            except Exception as exc:  # an op that will not run alone: said, never fatal
                first_line = (str(exc).strip().splitlines() or [""])[0][:200]
                ops.append(ReplayOp(**base, module=name, note=f"could not be re-run alone: "
                                                               f"{type(exc).__name__}: "
                                                               f"{first_line}"))
                continue
            introduced = _rel(y_cand, y_replay)
            # a precision explains only an error the op introduces itself
            explained = next((d for d in sorted(rounding, key=rounding.__getitem__)
                              if introduced <= EXPLAINED_FACTOR * rounding[d]), None) \
                if introduced >= INTRODUCED_SHARE * p.error else None
            ops.append(ReplayOp(**base, module=name, input_record=in_pair.ref_name,
                                input_candidate=in_pair.cand_name, introduced=introduced,
                                inherited=_rel(x_cand, x_ref), rounding=rounding,
                                explained_by=explained))
    first = ops[0] if ops else None
    precision = first.explained_by if first is not None and first.introduced is not None \
        and first.where == "introduced" else None
    return Replay(ops, precision=precision, seconds=time.perf_counter() - t0)
