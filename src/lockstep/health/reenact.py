"""Attention re-enacted from the dump's own q, k and v (``attention_output``): an engine's
attention output must be softmax(q·kᵀ·scale, causal)·v of the q after RoPE it recorded at
the step and the k after RoPE and v it recorded at every step up to it. A KV cache written
to the wrong slot, a mask aligned top-left, a key read one short, kv heads mapped wrong give
another output, from values that each look plausible: bugs one dump showed nothing of.

Read only where the dump holds one sequence from position 0 (its fed positions, where
recorded, run 0, 1, 2, ... over its steps: no cached prefix, no batch, no rejected drafts)
and the head counts are known (``n_heads``, ``n_kv_heads``, ``head_dim`` in its metadata, or
read off q and k after RoPE kept per head: their dims besides the tokens').
The attention output is the record named so, else, in a layer, the first record of no known
op after its q, k and v with heads × head_dim values per token whose every value lies in
the range v takes (an average of v rows must).
The scale is ``attn_scale`` where the metadata gives one (else 1/√head_dim), with
``attn_softcap`` and, on ``sliding_layers``, ``sliding_window`` applied.
"""

from __future__ import annotations

import numpy as np

from ..align.kinds import Kind
from ..align.transforms import meta_size
from ..compare import evidence as ev
from ..compare.reenact import attend, head_orders, query_rows
from .flags import RED, Checked, CheckResult, Flag, steps_text
from .view import DumpView, Entry

__all__ = ["check_attention_output", "LIMIT"]

#: relative L2 error of the recorded attention output against the re-enacted one above
#: which it is a red flag (bfloat16 attention leaves about 1e-2, a float16 KV cache 3e-4)
LIMIT = 0.1


def _one_sequence(view: DumpView) -> str:
    """Why the dump cannot be re-enacted as one sequence from position 0, or ""."""
    meta = view.dump.meta
    if meta.get("batch") or meta.get("batch_request"):
        return "a batched run (each sequence has its own mask)"
    end = 0
    for step in view.all_steps:
        positions = view.positions(step)
        if positions is None:
            continue
        if positions != list(range(end, end + len(positions))):
            return (f"step {step}'s positions do not follow the steps before it from 0 (a "
                    "cached prefix, a batch, rejected drafts, or positions fed wrong)")
        end += len(positions)
    return ""


def _values(view: DumpView, step: int, op: str, layer: int, heads: int, d: int,
            qkv_at: int) -> list[np.ndarray] | None:
    """``op`` of ``layer`` at ``step`` as (tokens, heads, d), in each order of dims it may be
    in; v (``qkv_at`` >= 0) from the fused qkv projection's columns where no v is recorded."""
    e = view.first(step, op, layer)
    if e is None and qkv_at >= 0:
        qkv = view.first(step, Kind.QKV, layer)
        rows = view.rows(qkv) if qkv is not None else None
        if rows is None or rows.shape[1] < qkv_at + heads * d:
            return None
        return [rows[:, qkv_at:qkv_at + heads * d].reshape(-1, heads, d)]
    a = view.values(e) if e is not None else None
    if a is None or a.size % (heads * d):
        return None
    return head_orders(a, heads, d)


def _outputs(view: DumpView, step: int, width: int) -> list[tuple[Entry, bool]]:
    """The attention outputs of ``step``, each with whether its name says so: the records
    named attention heads, else in each layer the first float record of no known op after
    the layer's q and k after RoPE and v, with ``width`` (heads × head_dim) values per token
    (an engine's own names: the C engine's ``L0.att``)."""
    named = [(e, True) for e in view.in_step(step) if e.op == Kind.ATTN_HEADS and
             e.layer is not None]
    if named:
        return named
    found: list[tuple[Entry, bool]] = []
    tokens = view.tokens(step)
    inputs: dict[int, set[str]] = {}
    for e in view.in_step(step):
        if e.layer is None:
            continue
        have = inputs.setdefault(e.layer, set())
        if e.op in (Kind.Q_ROPE, Kind.K_ROPE, Kind.V):
            have.add(e.op)
        elif len(have) == 3 and not e.op and e.is_float and tokens and \
                e.record.numel == tokens * width:
            found.append((e, False))
            have.add("found")  # one a layer
    return found


def _within(out: np.ndarray, v: np.ndarray) -> bool:
    """Every value of ``out`` (tokens, heads·d) lies within the range v's (keys, kv heads, d)
    take at its feature d, as a weighted average of v rows must: what is taken by its place
    for the attention output is one."""
    d = v.shape[-1]
    lo, hi = v.min(axis=(0, 1)), v.max(axis=(0, 1))
    slack = 1e-3 * max(float(np.abs(v).max()), 1e-30)
    x = out.reshape(out.shape[0], -1, d)
    return bool(np.all(x >= lo - slack) and np.all(x <= hi + slack))


def _reenact(view: DumpView, e: Entry, sizes: tuple[int, int, int],
             constants: tuple[float, float | None, int | None],
             named: bool = True) -> float | None:
    """The recorded attention output's relative L2 error against the re-enacted one (in the
    order of q and k dims that fits best), or None where an input is missing (or, for a
    record found by its place, ``named`` False, where its values cannot be an attention
    output's)."""
    heads, kv_heads, d = sizes
    layer = e.layer
    out = view.values(e)
    if layer is None or out is None or out.size % (heads * d):
        return None
    qs = _values(view, e.step, Kind.Q_ROPE, layer, heads, d, -1)
    ks, vs = [], []
    for step in view.all_steps:
        if step > e.step:
            break
        k = _values(view, step, Kind.K_ROPE, layer, kv_heads, d, -1)
        v = _values(view, step, Kind.V, layer, kv_heads, d, (heads + kv_heads) * d)
        if k is None or v is None:
            return None
        ks.append(k)
        vs.append(v[0])
    if not qs or not ks:
        return None
    vv = np.concatenate(vs)
    recorded = out.reshape(-1, heads * d)
    if not named and not _within(recorded, vv):
        return None
    scale, cap, window = constants
    best: float | None = None
    for q in qs:
        if q.shape[0] != recorded.shape[0]:
            continue
        for order in range(max(len(k) for k in ks)):
            kk = np.concatenate([k[min(order, len(k) - 1)] for k in ks])
            if kk.shape[0] != vv.shape[0] or kk.shape[0] < q.shape[0]:
                continue
            rows = query_rows(q.shape[0], kk.shape[0], heads)
            err = ev.rel_error(recorded[rows], attend(q, kk, vv, scale, cap, window, rows=rows))
            best = err if best is None or err < best else best
    return best


def _heads_of(view: DumpView, op: str) -> tuple[int, int] | None:
    """(heads, head_dim) read off the shape of a q (k) after RoPE kept per head, at a step of
    several tokens: its dims other than the tokens' and size 1 are (heads, head_dim), in that
    order; None where no such record says it unambiguously."""
    for step in view.all_steps:
        tokens = view.tokens(step)
        if not tokens or tokens < 2:
            continue
        e = next((x for x in view.in_step(step) if x.op == op and x.layer is not None), None)
        if e is None:
            continue
        dims = [n for n in e.record.shape if n != 1]
        if len(dims) != 3 or dims.count(tokens) != 1:
            return None
        dims.remove(tokens)
        heads, d = dims
        return (heads, d) if d % 2 == 0 else None
    return None


def _sizes(view: DumpView) -> tuple[int, int, int] | None:
    """(heads, kv heads, head_dim): from the metadata, else from the shapes of q and k after
    RoPE where they are kept per head."""
    meta = view.dump.meta
    heads, kv_heads, d = (meta_size(meta, s) for s in ("n_heads", "n_kv_heads", "head_dim"))
    if heads and d:
        return heads, kv_heads or heads, d
    q, k = _heads_of(view, Kind.Q_ROPE), _heads_of(view, Kind.K_ROPE)
    if q is None or k is None or q[1] != k[1] or q[0] % k[0]:
        return None
    return q[0], k[0], q[1]


def check_attention_output(view: DumpView) -> CheckResult:
    meta = view.dump.meta
    sizes = _sizes(view)
    if sizes is None:
        return CheckResult((), Checked(0, {"largest_error": None}, "the head counts are not "
                                       "in the dump's metadata (n_heads, head_dim), nor in "
                                       "the shapes of q and k after RoPE"))
    heads, kv_heads, d = sizes
    why = _one_sequence(view)
    if why:
        return CheckResult((), Checked(0, {"largest_error": None}, why))
    scale = float(meta.get("attn_scale") or d ** -0.5)
    cap = meta.get("attn_softcap")
    sliding = set(meta.get("sliding_layers") or ())
    seen, worst = 0, 0.0
    hits: list[tuple[Entry, float]] = []
    for step in view.steps:
        for e, named in _outputs(view, step, heads * d):
            window = meta.get("sliding_window") if e.layer in sliding else None
            err = _reenact(view, e, (heads, kv_heads, d), (scale, cap, window), named)
            if err is None or not np.isfinite(err):
                continue  # NaN is the nonfinite check's flag
            seen += 1
            worst = max(worst, err)
            if err > LIMIT:
                hits.append((e, err))
    flags = []
    if hits:
        e, err = hits[0]
        steps = tuple(sorted({h.step for h, _ in hits}))
        layers = sorted({h.layer for h, _ in hits if h.layer is not None})
        flags.append(Flag("attention_output", RED, f"the attention output is not softmax(q·kᵀ"
                          f"·{scale:.4g})·v of the engine's own q, k and v: {e.name} at step "
                          f"{e.step}, relative L2 {err:.3g} (layers "
                          f"{', '.join(map(str, layers[:12]))}; {steps_text(steps)}): its "
                          "mask, the KV cache it read, or which kv head each query head read",
                          step=e.step, record=e.name, seq=e.record.seq, steps=steps,
                          figures={"error": err, "layers": layers, "records": len(hits)}))
    return CheckResult(tuple(flags), Checked(
        seen, {"largest_error": worst if seen else None},
        "" if seen else "no attention output recorded with its q, k and v after RoPE"))
