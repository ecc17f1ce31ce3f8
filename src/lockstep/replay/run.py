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
from dataclasses import dataclass, field, replace
from typing import Any, Sequence

import numpy as np

from ..align.regroup import regroup
from ..align.transforms import apply_transform, merged_meta
from ..errors import LockstepError
from ..store.reader import Dump
from .ops import (
    GGUF_PREFIX,
    ROUNDINGS,
    gguf_rounding_fits,
    gguf_weight_types,
    module_of,
    run_op,
    tap_calls,
    why_not_replayable,
)

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
    input_transform: str | None = None  #: the layout transform between the two inputs
    introduced: float | None = None  #: candidate vs the reference op on the candidate's input
    inherited: float | None = None  #: the candidate's input vs the reference's
    rounding: dict[str, float] = field(default_factory=dict)  #: dtype -> its error here
    explained_by: str | None = None  #: a precision whose rounding explains the error
    note: str | None = None  #: why it was not replayed
    #: the other way: the candidate's op run on the reference's input, against the reference
    #: op's output (the candidate's own op, nothing inherited); None when not run
    reverse: float | None = None
    reverse_note: str | None = None  #: why the other way was not run

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
                "note": self.note, "reverse": self.reverse, "reverse_note": self.reverse_note}


@dataclass
class Replay:
    """What the dual test measured around a comparison's divergence."""

    ops: list[ReplayOp]
    precision: str | None = None  #: the candidate's measured operand precision, if any
    seconds: float = 0.0
    #: lockstep.replay.audit.Amplified: whether a divergence with no jump is the candidate's
    #: precision amplified by the input (audited only for such divergences)
    amplified: Any = None

    @property
    def first(self) -> ReplayOp | None:
        return self.ops[0] if self.ops else None

    def to_json(self) -> dict[str, Any]:
        return {"ops": [op.to_json() for op in self.ops], "precision": self.precision,
                "seconds": self.seconds, "amplified": None if self.amplified is None
                else self.amplified.to_json()}


def rel_l2(a: np.ndarray, b: np.ndarray) -> float:
    """Relative L2 error of ``a`` against ``b``, in float64 (0 for two zero tensors)."""
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


def _targets(comparison: Any, root: Any, max_ops: int, at: Any = None, *,
             every: bool = False) -> list[Any]:
    """``at``, or the first divergence (or, for drift, the first pair over tolerance), then
    more pairs over tolerance in that step, one per layer, in capture order. ``every``: each
    pair over tolerance in that step that a module of the reference outputs, from the first
    pair of the step on (``max_ops`` ignored)."""
    first = at or comparison.first_divergence or next(
        (p for p in comparison.results if p.over), None)
    if first is None:
        return []
    chosen, layers = [] if every else [first], set()
    for p in comparison.results:
        if len(chosen) >= max_ops and not every:
            break
        if p.step != first.step or not p.over or (not every and (p.ref_seq <= first.ref_seq
                                                                   or p is first)):
            continue
        found = module_of(root, p.ref_name)
        if found is None or why_not_replayable(found[1]):
            continue
        layer = next((t for t in p.ref_name.split(".") if t.isdigit()), None)
        if layer in layers and not every:
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


def _gguf_rounding(module: Any, name: str, weight_types: dict[str, str]) -> tuple[str, ...]:
    """``("gguf:TYPE",)`` when the module's weight is stored quantized (or in 16 bits) in the
    GGUF file a dump names, and that rounding fits it; else ``()``."""
    if not weight_types:
        return ()
    from ..checkpoint.weight_names import canonical_weight

    qtype = weight_types.get(canonical_weight(f"{name}.weight")[0])
    if qtype is None or qtype in ("F32", "F64") or not gguf_rounding_fits(module, qtype):
        return ()
    return (f"{GGUF_PREFIX}{qtype}",)


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
        if r_fit is None or (r_fit.dtype.kind != x_ref.dtype.kind and x_ref.dtype.kind in "iu"):
            continue
        if rel_l2(r_fit, x_ref) <= _SAME:
            c_fit = _trailing(c_arr, x_ref)
            if c_fit is not None:
                return p, c_fit.astype(x_ref.dtype)
    return None


def _recorded_step(comparison: Any, step: int) -> int:
    """The reference step to re-run for compared step ``step``: itself, or, when the
    comparison joined several reference steps into it (align.chunks), the last of them,
    whose rows are the joined step's last (what the replay's rows are matched against)."""
    chunks = getattr(comparison, "chunks", None)
    for side in chunks.sides if chunks is not None else ():
        group = side.group_of(step) if side.side == "reference" else None
        if group is not None:
            return group.steps[-1]
    return step


def replay_comparison(engine: Any, comparison: Any, prompt_ids: Sequence[int],
                      forced: Sequence[int] | None, *, max_ops: int = 6,
                      at: Any = None, candidate: Any = None,
                      cand_forced: Sequence[int] | None = None, every: bool = False) -> Replay:
    """Replay around ``comparison``'s divergence (or the pair ``at``) with ``engine`` (the
    reference, loaded, with a torch module tree); see the module docstring. ``candidate``: the
    candidate engine, loaded, with a module tree of its own, to run the other way too.
    ``every``: every op over tolerance in the divergence's step (``_targets``)."""
    from ..store.reader import open_dump

    t0 = time.perf_counter()
    root = engine.torch_module()
    if root is None:
        return Replay([], seconds=0.0)
    targets = _targets(comparison, root, max_ops, at, every=every)
    if not targets:
        return Replay([], seconds=time.perf_counter() - t0)
    step = _recorded_step(comparison, targets[0].step)
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
        for name, call in tap_calls(engine, modules, prompt_ids, step, forced).items():
            if call.single_input:
                seen[name] = call.numpy_io()
                continue
            # rotary embeddings (x, positions=...), masks, ...: not its input alone
            why = f"called with {len(call.args) + len(call.kwargs)} arguments, not its input alone"
            for i, p in enumerate(targets):
                found = module_of(root, p.ref_name)
                if found is not None and found[0] == name:
                    notes[i] = why
    ops: list[ReplayOp] = []
    with open_dump(comparison.reference.path) as ref, open_dump(comparison.candidate.path) as cand:
        dumps = _Dumps(*regroup(ref, cand)[:2])  # as compared: chunked prefills joined
        weight_types = gguf_weight_types(dict(cand.meta), dict(ref.meta))
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
                introduced = rel_l2(y_cand, y_replay)
                rounding: dict[str, float] = {}
                # (every op of a step: the roundings only where they could explain an error)
                if x_ref.dtype.kind == "f" and not (every and
                                                    introduced < INTRODUCED_SHARE * p.error):
                    for dtype in ROUNDINGS + _gguf_rounding(module, name, weight_types):
                        rounding[dtype] = rel_l2(run_op(module, x_ref, rounding=dtype), y_ref)
            except Exception as exc:  # an op that will not run alone: said, never fatal
                first_line = (str(exc).strip().splitlines() or [""])[0][:200]
                ops.append(ReplayOp(**base, module=name, note=f"could not be re-run alone: "
                                                               f"{type(exc).__name__}: "
                                                               f"{first_line}"))
                continue
            # a precision explains only an error the op introduces itself
            explained = next((d for d in sorted(rounding, key=rounding.__getitem__)
                              if introduced <= EXPLAINED_FACTOR * rounding[d]), None) \
                if introduced >= INTRODUCED_SHARE * p.error else None
            ops.append(ReplayOp(**base, module=name, input_record=in_pair.ref_name,
                                input_candidate=in_pair.cand_name,
                                input_transform=in_pair.transform, introduced=introduced,
                                inherited=rel_l2(x_cand, x_ref), rounding=rounding,
                                explained_by=explained))
    if candidate is not None:
        ops = _reverse(candidate, ops, refs_io={n: seen[n] for n in seen},
                       prompt_ids=prompt_ids, forced=cand_forced, step=step)
    first = ops[0] if ops else None
    # a float precision is compared again as the candidate's; a GGUF rounding is reported
    precision = first.explained_by if first is not None and first.introduced is not None \
        and first.where == "introduced" and first.explained_by in ROUNDINGS else None
    return Replay(ops, precision=precision, seconds=time.perf_counter() - t0)


def _reverse(candidate: Any, ops: list[ReplayOp], refs_io: dict[str, tuple[np.ndarray, np.ndarray]],
             prompt_ids: Sequence[int], forced: Sequence[int] | None,
             step: int) -> list[ReplayOp]:
    """The other way: each replayed op's candidate module run on the reference's input (the
    candidate's own call at that step, its input replaced), against the reference op's
    output. Said, never fatal, where it cannot run."""
    import torch

    root = candidate.torch_module()
    if root is None:
        return ops
    wanted: dict[str, Any] = {}
    modules: dict[str, tuple[str, Any] | None] = {}  # candidate record -> its module, once
    for op in ops:
        if op.introduced is not None:
            modules[op.candidate] = found = module_of(root, op.candidate)
            if found is not None:
                wanted[found[0]] = found[1]
    calls = tap_calls(candidate, wanted, prompt_ids, step, forced) if wanted else {}
    out: list[ReplayOp] = []
    for op in ops:
        if op.introduced is None or op.module not in refs_io:
            out.append(op)
            continue
        found = modules[op.candidate]
        call = calls.get(found[0]) if found is not None else None
        if found is None or call is None:
            why = ("not the output of a module of the candidate" if found is None
                   else "the candidate's module did not run at that step")
            out.append(replace(op, reverse_note=why))
            continue
        x_ref, y_ref = refs_io[op.module]
        live = call.input
        if op.input_transform:
            out.append(replace(op, reverse_note=f"the inputs' layouts differ "
                                                f"({op.input_transform})"))
            continue
        other = call.second_activation
        if other is not None:
            out.append(replace(op, reverse_note=f"it takes a second activation beside its "
                                                f"input ({other}: a residual it adds?), which "
                                                "the reference's op does not"))
            continue
        if x_ref.size != live.numel():
            out.append(replace(op, reverse_note="its input's size differs from the "
                                                "reference's"))
            continue
        x = torch.from_numpy(np.array(x_ref, order="C")).reshape(live.shape).to(
            device=live.device, dtype=live.dtype)
        args, kwargs = call.with_input(x)
        try:
            with torch.no_grad():
                y = found[1](*args, **kwargs)
        except Exception as exc:  # an op that will not run again: said, never fatal
            first_line = (str(exc).strip().splitlines() or [""])[0][:200]
            out.append(replace(op, reverse_note=f"could not be re-run: {type(exc).__name__}: "
                                                f"{first_line}"))
            continue
        y = y[0] if isinstance(y, (tuple, list)) else y
        y_np = y.detach().to("cpu", torch.float64).numpy()
        fit = _trailing(y_np, y_ref)
        out.append(replace(op, reverse=rel_l2(fit, y_ref)) if fit is not None else
                   replace(op, reverse_note="its output's shape does not fit the reference's"))
    return out
