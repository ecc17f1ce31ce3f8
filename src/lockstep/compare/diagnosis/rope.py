"""RoPE read back from the dumps: q/k before and after it as (positions, heads, head_dim),
the pair convention and base the rotation fits, and the ``rope`` diagnosis (the divergence
appears at RoPE: another pair convention, another base, other positions)."""

from __future__ import annotations

from typing import Any

import numpy as np

from ...align.kinds import Kind as K
from ...align.transforms import apply_transform
from ...errors import LockstepError
from ...textfmt import fmt
from .. import evidence as ev
from ..case import Case, label
from ..ops import ROPE_TABLES
from ..pair_result import PairResult
from .model import Diagnosis, make, rule

__all__ = ["rope", "pre_rope", "before_after", "rope_views", "pairing_of"]


def pre_rope(case: Case) -> PairResult | None:
    """The q or k before RoPE of the first divergence's layer (after QK-norm if any)."""
    role = case.role(case.first)
    return case.find((role.op[0] + "_norm", role.op[0]), role.layer)


def before_after(pre: PairResult, post: PairResult) -> str:
    """The sentence: before RoPE agrees, after RoPE does not."""
    return (f"before RoPE, {label(pre)} agrees (relative L2 {fmt(pre.error)}); after RoPE, "
            f"{label(post)} does not ({fmt(post.error)})")


def _heads(a: np.ndarray, head_dim: int, rows: int) -> np.ndarray | None:
    """``a`` as (rows, heads, head_dim), from (rows, H*D), (rows, H, D) or (H, rows, D)."""
    s = ev.squeeze(a)
    if s.size % (head_dim * rows):
        return None
    if s.ndim == 3 and s.shape[1] == rows and s.shape[0] != rows:
        s = s.transpose(1, 0, 2)
    return s.reshape(rows, -1, head_dim)


def rope_views(case: Case, pre: PairResult
                ) -> tuple[np.ndarray, np.ndarray, np.ndarray, int] | None:
    """(x, reference, candidate) as (positions, heads, head_dim), x the reference's input to
    RoPE, and head_dim; None when the shapes do not allow it."""
    xa, arrays = case.arrays(pre), case.arrays(case.first)
    d = case.head_dim(arrays[0] if arrays is not None else None)
    if xa is None or arrays is None or not d or d % 2:
        return None
    x0 = ev.squeeze(xa[0])
    rows = x0.shape[0] if x0.ndim == 3 or (x0.ndim == 2 and x0.shape[-1] != d) else 1
    x, r, c = (_heads(a, d, rows) for a in (xa[0], *arrays))
    if x is None or r is None or c is None or not x.shape == r.shape == c.shape:
        return None
    return x, r, c, d


def pairing_of(x: np.ndarray, y: np.ndarray) -> str | None:
    """The pair convention under which ``y`` is a rotation of ``x`` ("halfsplit" or
    "interleaved"), or None."""
    fits = {p: ev.rotation(x, y, p)[1] for p in ("halfsplit", "interleaved")}
    best = min(fits, key=lambda p: fits[p])
    return best if fits[best] <= 1e-3 else None


@rule("rope")
def rope(case: Case) -> Diagnosis | None:
    """The divergence appears at RoPE at prefill (q/k before it agree): the pair convention,
    the base (from q/k or from the cos/sin tables), the positions."""
    f = case.first
    role = case.role(f)
    if role.op not in (K.Q_ROPE, K.K_ROPE, K.POSITIONS, *ROPE_TABLES):
        return None
    pre = pre_rope(case) if role.op in (K.Q_ROPE, K.K_ROPE) else None
    if pre is not None and not case.agrees(pre):
        return None
    evidence: list[str] = [before_after(pre, f)] if pre is not None else []
    detail: dict[str, Any] = {}
    title = f"the divergence appears at RoPE ({label(f)}, step {f.step})"
    arrays = case.arrays(f)
    if role.op == K.POSITIONS and arrays is not None:
        rp, cp = (a.reshape(-1)[:16].astype(int).tolist() for a in arrays)
        title = f"the positions fed at step {f.step} differ"
        evidence.append(f"positions: reference {rp}, candidate {cp}")
        detail.update(reference_positions=rp, candidate_positions=cp)
    elif role.op in ROPE_TABLES and arrays is not None:
        kind = role.op[5:]
        r, c = (ev.squeeze(a) for a in arrays)
        if r.ndim == 2 and len(r) > 1:
            base_r, base_c = ev.table_base(r[1], kind), ev.table_base(c[1], kind)
            if base_r and base_c:
                detail.update(reference_base=base_r, candidate_base=base_c)
                evidence.append(f"the {kind} tables' rows for position 1 give a RoPE base of "
                                f"{base_c:.6g} (candidate) and {base_r:.6g} (reference)")
                if abs(base_c / base_r - 1) > 1e-2:
                    detail["cause"] = "base"
                    title = (f"RoPE base {base_c:.4g} where the reference uses {base_r:.4g} "
                             "(rope_theta)")
    elif pre is not None:
        views = rope_views(case, pre)
        if views is not None:
            found = _rope_tests(case, *views, evidence, detail)
            if found is None and _convention(pre) is not None:
                found = _in_own_layout(case, views, pre, f, evidence, detail)
            title = found or title
    checks = ["the RoPE pair convention: interleaved (2i, 2i+1; GGUF, Meta) vs half-split "
              "(i, i+head_dim/2; transformers), and Q/K weights permuted by a conversion",
              "the RoPE base (rope_theta) and scaling (rope_scaling, partial rotary dims)",
              "the positions fed to RoPE at prefill: 0..T-1",
              "the cos/sin cache: computed in float32, for enough positions, indexed by "
              "position"]
    if detail.get("cause") == "base":
        checks.insert(0, checks.pop(1))
    elif role.op == K.POSITIONS:
        checks.insert(0, checks.pop(2))
    return make("rope", title, checks, evidence, **detail)


#: a RoPE layout convention the pairing applies to the candidate, and the one that undoes it
_INVERSE = {"rope_interleaved": "rope_halfsplit", "rope_halfsplit": "rope_interleaved"}


def _convention(p: PairResult) -> str | None:
    """The RoPE layout convention a pair's candidate transform starts with, if any."""
    first = (p.cand_transform or "").split("|")[0]
    return first if first in _INVERSE else None


def _in_own_layout(case: Case, views: tuple[np.ndarray, np.ndarray, np.ndarray, int],
                   pre: PairResult, f: PairResult, evidence: list[str],
                   detail: dict[str, Any]) -> str | None:
    """The RoPE tests with q/k in the candidate's own layout (its q/k before RoPE paired
    through a RoPE layout convention: weights in the other RoPE order, a GGUF's): there the
    reference's rotation has the candidate layout's pairs, and a rotation of the other pairs
    is the classic mismatch of GGUF weights and NeoX RoPE. The candidate after RoPE is taken
    as it is, or with its own pair's convention undone."""
    x, r, c, d = views
    back = _INVERSE[str(_convention(pre))]
    meta = {"head_dim": d}
    try:
        x, r = apply_transform(back, x, meta), apply_transform(back, r, meta)
        c = apply_transform(back, c, meta) if _convention(f) else c
    except LockstepError:
        return None
    title = _rope_tests(case, x, r, c, d, evidence, detail)
    if title is not None:
        detail["layout"] = "candidate"
        evidence.append("tested with q/k in the candidate's own layout (its q/k weights hold "
                        "the other RoPE order, as a GGUF's do)")
        title += " (in the candidate's layout: its q/k weights are in the other RoPE order)"
    return title


def _rope_tests(case: Case, x: np.ndarray, r: np.ndarray, c: np.ndarray, d: int,
                evidence: list[str], detail: dict[str, Any]) -> str | None:
    """Position 0's signature, the other pair convention, another base; a title if found."""
    rows = len(x)
    if rows > 1:
        errs = ev.index_errors(r, c, axis=0)
        if errs[0] <= case.good() and np.all(errs[1:] > case.good()):
            evidence.append(f"position 0 agrees (relative L2 {fmt(float(errs[0]))}), later "
                            f"positions do not (up to {fmt(float(errs[1:].max()))}): "
                            "RoPE's signature, position 0 is not rotated")
    pairing = pairing_of(x, r)
    if pairing is None:
        return None
    other = "interleaved" if pairing == "halfsplit" else "halfsplit"
    angles = ev.rotation(x, r, pairing)[0]
    swapped = ev.rel_error(c, ev.rotate(x, angles, other))
    names = {"halfsplit": f"half-split pairs (i, i+{d // 2})",
             "interleaved": "interleaved pairs (2i, 2i+1)"}
    if case.explains(swapped):
        detail.update(cause="pairing", reference_pairing=pairing, candidate_pairing=other,
                      error_after=swapped)
        evidence.append(f"rotating the reference's input by the reference's angles over "
                        f"{names[other]} reproduces the candidate: relative L2 {fmt(swapped)}")
        return f"RoPE rotates {names[other]} where the reference rotates {names[pairing]}"
    cand_angles, residual = ev.rotation(x, c, pairing)
    if rows < 2 or residual > 1e-3:
        return None
    base_r, base_c = ev.rope_base(angles[1], d), ev.rope_base(cand_angles[1], d)
    if not base_r or not base_c or abs(base_c / base_r - 1) < 1e-2:
        return None
    after = ev.rel_error(c, ev.rotate(x, ev.rope_angles(np.arange(rows), base_c, d), pairing))
    if not case.explains(after):
        return None
    ref_after = ev.rel_error(r, ev.rotate(x, ev.rope_angles(np.arange(rows), base_r, d),
                                          pairing))
    if ref_after > 1e-3:  # no single base gives the reference's frequencies: a rope scaling
        detail.update(cause="scaling", candidate_base=base_c, error_after=after,
                      reference_base_error=ref_after)
        evidence.append(f"the candidate's rotation is plain RoPE with base {base_c:.6g} "
                        f"(relative L2 {fmt(after)}); no single base reproduces the "
                        f"reference's (best fit {base_r:.6g}, relative L2 {fmt(ref_after)})")
        return (f"RoPE turns with the plain frequencies of base {base_c:.4g} where the "
                "reference's are rescaled (rope_scaling: llama3, YaRN, ...)")
    detail.update(cause="base", reference_base=base_r, candidate_base=base_c,
                  error_after=after)
    evidence.append(f"the candidate's rotation at position 1 fits a RoPE base of "
                    f"{base_c:.6g} (the reference's: {base_r:.6g}); with that base the "
                    f"reference's input reproduces the candidate: relative L2 {fmt(after)}")
    return f"RoPE base {base_c:.4g} where the reference uses {base_r:.4g} (rope_theta)"
