"""One op of each implementation timed on the inputs recorded in their dumps, with the error
between them: ``lockstep bench --op NAME REF.lsd CAND.lsd``.

The two dumps are compared to find the candidate's partner of the reference record ``NAME``
at a step. Each engine (from the spec its dump names, or one given) is loaded and run on the
dump's tokens to that step with a hook on the op's module alone (the replay machinery's
targeted pass), which gives the op's other arguments (positions, masks, the attention
metadata). The op's first argument is then the tensor its own dump recorded there (found by
value), so both run on real recorded inputs. Measured:

* the time of one call of each, warm-up rounds first, then interleaved rounds (the order
  alternates), with medians, p10/p90, bootstrap intervals and the ratio (``bench.stats``);
* **same input**: the candidate's op run on the reference's recorded input against the
  reference's op on it, the error the candidate's op itself makes;
* **reproduces**: each side's replayed output against what its dump recorded for the op, so a
  run that does not reproduce the recording (another option, another bug) is seen.

A call that updates a transformers KV cache can be repeated only at the prefill, where the
cache is left out (the op then attends to the prompt alone, as it did); at a decode step it is
refused with the reason.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np

from ..errors import UsageError
from ..replay.run import rel_l2
from .stats import NOISY_WHY, Ratio, Summary, ratio, summarize

__all__ = ["OpSide", "OpBench", "bench_op"]

_SAME = 1e-5  # a dump record holds the op's input when it agrees with it to this


@dataclass
class OpSide:
    """One implementation's op: where it came from and what it measured."""

    spec: str
    record: str  #: the dump record of the op's output
    module: str  #: the module run
    cls: str  #: its class
    input_record: str | None  #: the dump record fed as its first argument (None: live input)
    reproduces: float | None  #: replayed output against the dump's record of it
    time: Summary | None = None  #: seconds per call

    def to_json(self) -> dict[str, Any]:
        return {"spec": self.spec, "record": self.record, "module": self.module,
                "class": self.cls, "input_record": self.input_record,
                "reproduces": self.reproduces,
                "seconds": None if self.time is None else self.time.to_json()}


@dataclass
class OpBench:
    """Both sides of one op, timed and compared."""

    step: int
    reference: OpSide
    candidate: OpSide
    same_input_error: float | None  #: candidate op vs reference op on the reference's input
    pair_error: float  #: the comparison's own error for this pair (inherited + introduced)
    ratio: Ratio | None = None  #: candidate / reference time
    settings: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {"step": self.step, "reference": self.reference.to_json(),
                "candidate": self.candidate.to_json(),
                "same_input_error": self.same_input_error, "pair_error": self.pair_error,
                "ratio": None if self.ratio is None else self.ratio.to_json(),
                "settings": self.settings, "notes": self.notes}


@dataclass(frozen=True)
class _Pair:
    """The two records of the op: from the comparison, or matched by value here."""

    step: int
    ref_name: str
    cand_name: str
    ref_seq: int
    cand_seq: int
    error: float


def _base(n: str) -> str:
    return n[:-2] if n.endswith(":0") else n


def _enclosing(comparison: Any, cand: Any, r: Any, cand_name: str | None) -> Any:
    """The candidate record of the module that encloses the partner of ``r``'s last paired
    op: ``model.layers.1.self_attn.o_proj ~ layers.1.attention.wo`` gives
    ``layers.1.attention`` for ``model.layers.1.self_attn``."""
    prefix = _base(r.name) + "."
    inner = [p for p in comparison.results if p.step == r.step and ":" not in p.ref_name
             and ":" not in p.cand_name and p.ref_name.startswith(prefix)]
    if not inner:
        return None
    last = max(inner, key=lambda p: p.ref_seq)
    depth = last.ref_name[len(prefix):].count(".") + 1
    parts = last.cand_name.split(".")
    if len(parts) <= depth:
        return None
    want = cand_name or ".".join(parts[:-depth])
    return next((c for c in cand.records if c.step == r.step and c.has_data
                 and _base(c.name) == _base(want)), None)


def _find_pair(comparison: Any, ref: Any, cand: Any, name: str, cand_name: str | None,
               step: int | None) -> _Pair:
    """The comparison's pair for ``name`` (and ``cand_name``) at ``step``; for a record the
    comparison left unpaired (an attention output equal to its o_proj's), the candidate
    record of that step with the same size whose values are nearest, or ``cand_name``."""
    for p in comparison.results:
        if _base(p.ref_name) == _base(name) and (step is None or p.step == step) \
                and (cand_name is None or _base(p.cand_name) == _base(cand_name)):
            return _Pair(p.step, p.ref_name, p.cand_name, p.ref_seq, p.cand_seq, p.error)
    refs = [r for r in ref.records if _base(r.name) == _base(name) and r.has_data
            and (step is None or r.step == step)]
    if not refs:
        names = sorted({r.name for r in ref.records if step is None or r.step == step})
        near = [n for n in names if name.split(".")[-1] in n][:5] or names[:5]
        raise UsageError(f"--op {name!r}: the reference dump has no such record"
                         + (f" at step {step}" if step is not None else "")
                         + f" (its names include {', '.join(near)})")
    r = refs[0]
    by_structure = _enclosing(comparison, cand, r, cand_name)
    if by_structure is not None:
        return _Pair(r.step, r.name, by_structure.name, r.seq, by_structure.seq, float("nan"))
    x = ref.read(r)
    found = [(rel_l2(cand.read(c), x.reshape(-1)), c) for c in cand.records
             if c.step == r.step and c.has_data and c.numel == r.numel
             and (cand_name is None or _base(c.name) == _base(cand_name))]
    low = min((e for e, _ in found), default=None)
    # records equal to the nearest (a module and the last op inside it): the outermost, which
    # finishes last
    best = None if low is None else max(((e, c) for e, c in found if e <= low + 1e-6),
                                        key=lambda ec: ec[1].seq)
    if best is None or (cand_name is None and not best[0] <= 0.5):
        raise UsageError(f"--op {name!r}: no candidate record at step {r.step} pairs with it; "
                         "name it with --cand-op")
    return _Pair(r.step, r.name, best[1].name, r.seq, best[1].seq, best[0])


def _stateless(call: Any, step: int, module: str) -> None:
    """Leave a transformers KV cache out of a prefill call; refuse it at a decode step."""
    for key, value in list(call.kwargs.items()):
        if type(value).__name__.endswith("Cache"):
            if step > 0:
                raise UsageError(f"--op {module}: at decode step {step} this op updates a KV "
                                 f"cache ({type(value).__name__}) on every call, so it cannot "
                                 "be repeated; bench it at the prefill (--step 0)")
            call.kwargs[key] = None


def _recorded_input(dump: Any, step: int, before_seq: int, x: Any) -> tuple[str, Any] | None:
    """The dump's record at ``step`` (nearest before ``before_seq``) holding ``x``'s value,
    as a tensor shaped and typed as ``x``."""
    import torch

    live = x.detach().float().cpu().numpy() if x.is_floating_point() else x.cpu().numpy()
    for rec in sorted(dump.records, key=lambda r: -r.seq):
        if rec.step != step or rec.seq >= before_seq or rec.numel != live.size \
                or not rec.has_data:
            continue
        arr = dump.read(rec).reshape(live.shape)  # floats; integer ids exactly
        same = np.array_equal(arr, live) if live.dtype.kind in "iub" else rel_l2(arr, live) <= _SAME
        if not same:
            continue
        t = torch.from_numpy(np.array(arr, order="C")).to(device=x.device, dtype=x.dtype)
        return rec.name, t
    return None


def _call(module: Any, call: Any, first: Any) -> Any:
    import torch

    args, kwargs = call.with_input(first)
    with torch.no_grad():
        out = module(*args, **kwargs)
    return out[0] if isinstance(out, (tuple, list)) else out


def _sync(t: Any) -> None:
    import torch

    if getattr(t, "is_cuda", False):
        torch.cuda.synchronize(t.device)


def _np(t: Any) -> np.ndarray:
    return t.detach().float().cpu().numpy()


def bench_op(reference: str, candidate: str, name: str, *, cand_name: str | None = None,
             step: int | None = None, ref_spec: str | None = None, cand_spec: str | None = None,
             ref_options: dict[str, Any] | None = None,
             cand_options: dict[str, Any] | None = None, warmup: int = 10, iters: int = 100,
             progress: Callable[[int, int, str], Any] = lambda done, total, what: None
             ) -> OpBench:
    """Time and compare the op ``name`` (a reference record) of the two dumps' engines; see
    the module docstring."""
    from ..compare import compare
    from ..engines import open_engine
    from ..engines.rerun import fed_tokens, options_from_meta
    from ..replay.ops import module_of, tap_calls
    from ..store.reader import open_dump

    if warmup < 0 or iters < 1:
        raise UsageError("--warmup must be 0 or more and --iters 1 or more")
    progress(0, 0, "comparing the dumps")
    comparison = compare(reference, candidate)
    with open_dump(reference) as ref, open_dump(candidate) as cand:
        pair = _find_pair(comparison, ref, cand, name, cand_name, step)
    step = pair.step
    sides: list[OpSide] = []
    runs: list[tuple[Any, Any, Any]] = []  # (module, call, first argument) per side
    notes: list[str] = []
    for label, path, spec, given, rec_name, seq in (
            ("reference", reference, ref_spec, ref_options, pair.ref_name, pair.ref_seq),
            ("candidate", candidate, cand_spec, cand_options, pair.cand_name, pair.cand_seq)):
        with open_dump(path) as dump:
            meta = dict(dump.meta)
            spec = spec or meta.get("spec")
            if not isinstance(spec, str):
                raise UsageError(f"{path} does not say which engine recorded it: give "
                                 f"--{label[:3]}-engine SPEC")
            ids = meta.get("prompt_token_ids")
            if not ids:
                raise UsageError(f"{path} has no prompt_token_ids in its metadata")
            forced = meta.get("generated_token_ids") or fed_tokens(dump)
            engine = open_engine(spec, isolate=False, **options_from_meta(spec, meta, given))
            if engine.native:
                raise UsageError(f"--op runs one module of each engine; {spec} has no module "
                                 "tree (hf:, zoo: and py: engines with torch_module() do)")
            progress(0, 0, f"loading {spec}")
            engine.load()
            root = engine.torch_module()
            found = module_of(root, rec_name) if root is not None else None
            if found is None:
                raise UsageError(f"--op: {rec_name!r} in {path} is not the output of a "
                                 f"module of {spec}")
            module_name, module = found
            calls = tap_calls(engine, {module_name: module}, ids, step, forced)
            if module_name not in calls:
                raise UsageError(f"--op: {module_name} did not run at step {step} of {spec}")
            call = calls[module_name]
            _stateless(call, step, module_name)
            first = call.input
            got = _recorded_input(dump, step, seq, first)
            if got is None:
                notes.append(f"{label}: no record of {path} holds {module_name}'s input at "
                             f"step {step}; its live input was used")
            else:
                first = got[1]
            out = _np(_call(module, call, first))
            recorded = dump.read(next(r for r in dump.records if r.seq == seq))
            reproduces = rel_l2(out, recorded.reshape(out.shape)) if recorded.size == out.size \
                else None
        sides.append(OpSide(spec, rec_name, module_name, type(module).__name__,
                            None if got is None else got[0], reproduces))
        runs.append((module, call, first))
    (r_mod, r_call, r_first), (c_mod, c_call, c_first) = runs
    same: float | None = None
    other = c_call.second_activation or r_call.second_activation
    if other is not None:
        notes.append(f"an op takes a second activation beside its input ({other}: a "
                     "residual it adds?): no same-input error")
    elif r_first.numel() == c_first.numel():
        shared = r_first.reshape(c_first.shape).to(device=c_first.device, dtype=c_first.dtype)
        r_out, c_out = _np(_call(r_mod, r_call, r_first)), _np(_call(c_mod, c_call, shared))
        if r_out.size == c_out.size:
            same = rel_l2(c_out.reshape(r_out.shape), r_out)
    else:
        notes.append("the two ops take inputs of different sizes: no same-input error")
    samples: list[list[float]] = [[], []]
    total = warmup + iters
    for i in range(total):
        order = (0, 1) if i % 2 == 0 else (1, 0)
        for side in order:
            module, call, first = runs[side]
            _sync(first)
            t0 = time.perf_counter()
            _call(module, call, first)
            _sync(first)
            if i >= warmup:
                samples[side].append(time.perf_counter() - t0)
        progress(i + 1, total, "timing" if i >= warmup else "warming up")
    sides[0].time, sides[1].time = summarize(samples[0]), summarize(samples[1])
    clock = "perf_counter, synchronized per call" if getattr(r_first, "is_cuda", False) \
        else "perf_counter"
    return OpBench(step, sides[0], sides[1], same, pair.error, ratio(samples[1], samples[0]),
                   {"warmup": warmup, "iters": iters, "clock": clock}, notes)


def op_lines(result: OpBench) -> list[str]:
    """The terminal face, as plain lines."""

    def ms(s: Summary | None) -> str:
        if s is None:
            return "-"
        return (f"{1e3 * s.median:.3f} ms [{1e3 * s.p10:.3f}-{1e3 * s.p90:.3f}] "
                f"({1e3 * s.low:.3f}-{1e3 * s.high:.3f}){s.flags}")

    def err(x: float | None) -> str:
        return "-" if x is None else f"{x:.3g}"

    r, c = result.reference, result.candidate
    s = result.settings
    lines = [f"lockstep bench --op, step {result.step}: {s['iters']} calls each after "
             f"{s['warmup']} warm-up, interleaved ({s['clock']}); median [p10-p90] "
             "(95% interval)"]
    for label, side in (("reference", r), ("candidate", c)):
        lines.append(f"  {label:9}  {side.module} ({side.cls}, {side.spec})")
        lines.append(f"             {ms(side.time)} per call; input "
                     f"{side.input_record or 'live (not in the dump)'}; reproduces its "
                     f"recorded output to {err(side.reproduces)}")
    if result.ratio is not None:
        q = result.ratio
        mark = " faster" if q.high < 1 else (" slower" if q.low > 1 else "")
        lines.append(f"  cand/ref time {q.value:.2f} ({q.low:.2f}-{q.high:.2f}){mark}")
    lines.append(f"  error on the same input (the candidate op's own): "
                 f"{err(result.same_input_error)}; the pair in the comparison: "
                 f"{err(result.pair_error)}")
    if any(side.time is not None and side.time.noisy for side in (r, c)):
        lines.append(f"  NOISY: the call times {NOISY_WHY}")
    lines.extend(f"  note: {n}" for n in result.notes)
    return lines
