"""The ``moe`` diagnosis: a mixture-of-experts layer's routing, read from both dumps.

A MoE layer records its router logits (tokens, experts), the chosen experts' weights and ids
(tokens, k), the routed rows' activation (every (token, expert) row at once, sorted by expert),
the routed experts' sum and the MLP output (canonical names in align/tables.py). From these:
which tokens chose other experts, whether the router logits agree, whether the weights sum to
1 on each side, which experts' rows differ, and whether the shared expert is in the sum.

A choice that flips where the reference's two logits are closer than the candidate's own
logit error is a near-tie: precision, not a bug (``near_tie_flip``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from ...align.kinds import Kind as K
from ...textfmt import fmt
from .. import evidence as ev
from ..case import Case
from ..pair_result import PairResult
from .model import Diagnosis, make, rule

__all__ = ["MOE_OPS", "Routing", "routing_of", "near_tie_flip", "moe"]

#: canonical ops (after ``layers.N.``) of a MoE layer
MOE_OPS = (K.ROUTER, K.EXPERT_WEIGHTS, K.EXPERT_IDS, "experts.gate_act", K.EXPERTS_OUT,
           "shared_expert.out", "shared_expert_gate", "mlp_out")
_ROUTING_OPS = (K.ROUTER, K.EXPERT_WEIGHTS, K.EXPERT_IDS)
_SHIFTS = {1: "shifted by one", -1: "shifted back by one"}


@dataclass(frozen=True)
class Routing:
    """One MoE layer's routing at one step, both sides (tokens, k) and (tokens, experts)."""

    layer: int
    ref_ids: np.ndarray
    cand_ids: np.ndarray
    ref_weights: np.ndarray | None
    cand_weights: np.ndarray | None
    ref_logits: np.ndarray | None
    cand_logits: np.ndarray | None

    @property
    def n_experts(self) -> int:
        if self.ref_logits is not None:
            return int(self.ref_logits.shape[-1])
        return int(max(self.ref_ids.max(), self.cand_ids.max())) + 1

    def chosen(self, side: str, token: int) -> set[int]:
        ids = self.ref_ids if side == "ref" else self.cand_ids
        return {int(i) for i in ids[token]}

    @property
    def flipped(self) -> list[int]:
        """Tokens whose set of chosen experts differs."""
        return [t for t in range(self.ref_ids.shape[0])
                if self.chosen("ref", t) != self.chosen("cand", t)]

    @property
    def logit_error(self) -> float:
        if self.ref_logits is None or self.cand_logits is None:
            return float("nan")
        return ev.rel_error(self.ref_logits, self.cand_logits)

    def shift(self) -> int | None:
        """s when every candidate id is the reference's plus s (mod the expert count)."""
        n = self.n_experts
        for s in (1, -1, 2, -2):
            if np.array_equal(np.sort((self.ref_ids + s) % n, -1), np.sort(self.cand_ids, -1)):
                return s
        return None

    def gap(self, token: int) -> float:
        """The reference's logit gap between an expert only it chose and one only the
        candidate chose (the smallest such gap)."""
        assert self.ref_logits is not None
        only_ref = self.chosen("ref", token) - self.chosen("cand", token)
        only_cand = self.chosen("cand", token) - self.chosen("ref", token)
        row = self.ref_logits[token]
        return min(abs(row[a] - row[b]) for a in only_ref for b in only_cand)

    def near_tie(self, token: int) -> bool:
        """The flip at ``token`` is within what the candidate's own logit error can do."""
        if self.ref_logits is None or self.cand_logits is None:
            return False
        slack = float(np.abs(self.cand_logits[token] - self.ref_logits[token]).max())
        return self.gap(token) <= 2.0 * slack

    def weights_by_expert(self, side: str) -> np.ndarray | None:
        """(tokens, experts) with each chosen expert's weight, zero elsewhere."""
        ids, w = (self.ref_ids, self.ref_weights) if side == "ref" else \
            (self.cand_ids, self.cand_weights)
        if w is None:
            return None
        out = np.zeros((ids.shape[0], self.n_experts))
        np.put_along_axis(out, ids % self.n_experts, w, axis=-1)
        return out


def _as_2d(a: np.ndarray, cols: int | None = None) -> np.ndarray:
    a = np.asarray(a, dtype=np.float64)
    return a.reshape(-1, cols if cols else a.shape[-1])


def _pair(case: Case, op: str, layer: int) -> PairResult | None:
    return next((p for p in case.step if case.role(p).op == op and case.role(p).layer == layer),
                None)


def routing_of(case: Case, layer: int) -> Routing | None:
    """The layer's routing at the first divergence's step, or None without expert ids."""
    ids = _pair(case, K.EXPERT_IDS, layer)
    arrays = case.arrays(ids) if ids is not None else None
    if arrays is None or arrays[0].size != arrays[1].size:
        return None
    k = int(arrays[0].shape[-1])
    ref_ids, cand_ids = (_as_2d(a, k).astype(np.int64) for a in arrays)
    got = {}
    for op in (K.EXPERT_WEIGHTS, K.ROUTER):
        p = _pair(case, op, layer)
        a = case.arrays(p) if p is not None else None
        got[op] = (None, None) if a is None or a[0].shape != a[1].shape else \
            (_as_2d(a[0]), _as_2d(a[1]))
    return Routing(layer, ref_ids, cand_ids, *got[K.EXPERT_WEIGHTS], *got[K.ROUTER])


def near_tie_flip(case: Case) -> bool:
    """The first divergence is a routing choice that flipped at near-ties only (or the same
    experts listed in another order), with router logits within precision: drift."""
    role = case.role(case.first)
    if role.op not in _ROUTING_OPS or role.layer is None:
        return False
    routing = routing_of(case, role.layer)
    router = _pair(case, K.ROUTER, role.layer)
    if routing is None or router is None or not case.agrees(router):
        return False
    if not all(routing.near_tie(t) for t in routing.flipped):
        return False
    ref_w, cand_w = routing.weights_by_expert("ref"), routing.weights_by_expert("cand")
    if ref_w is None or cand_w is None:
        return True
    same = [t for t in range(ref_w.shape[0]) if t not in routing.flipped]
    return ev.rel_error(ref_w[same], cand_w[same]) <= max(10 * router.noise, 1e-3)


def _tokens(tokens: Sequence[int]) -> str:
    words = [str(t) for t in tokens]
    return words[0] if len(words) == 1 else ", ".join(words[:-1]) + " and " + words[-1]


def _experts(ids: set[int]) -> str:
    return "{" + ", ".join(map(str, sorted(ids))) + "}"


def _sums(w: np.ndarray) -> str:
    s = w.sum(-1)
    lo, hi = float(s.min()), float(s.max())
    return f"{lo:.3g}" if abs(hi - lo) < 5e-4 else f"{float(s.mean()):.3g} ({lo:.3g}-{hi:.3g})"


def _softmax_of_chosen(r: Routing) -> bool:
    """The candidate's weights are the softmax over its chosen experts' logits alone."""
    if r.cand_logits is None or r.cand_weights is None:
        return False
    chosen = np.take_along_axis(r.cand_logits, r.cand_ids % r.n_experts, -1)
    e = np.exp(chosen - chosen.max(-1, keepdims=True))
    return ev.rel_error(e / e.sum(-1, keepdims=True), r.cand_weights) < 1e-3


def _per_expert(case: Case, r: Routing) -> list[tuple[int, int, float]]:
    """(expert, rows, relative error) of the routed rows' activation, per expert that ran."""
    p = _pair(case, "experts.gate_act", r.layer)
    a = case.arrays(p) if p is not None else None
    if a is None or a[0].shape != a[1].shape:
        return []
    ref, cand = _as_2d(a[0]), _as_2d(a[1])
    order = np.sort(r.ref_ids.reshape(-1))
    if order.size != ref.shape[0]:
        return []
    return [(int(e), int((order == e).sum()), ev.rel_error(ref[order == e], cand[order == e]))
            for e in np.unique(order)]


def _token_errors(case: Case, op: str, layer: int) -> list[tuple[int, float]] | None:
    p = _pair(case, op, layer)
    a = case.arrays(p) if p is not None else None
    if a is None or a[0].size != a[1].size:
        return None
    ref, cand = _as_2d(a[0]), _as_2d(a[1])
    return [(t, ev.rel_error(ref[t], cand[t])) for t in range(ref.shape[0])]


def _top_k_sums(logits: np.ndarray) -> dict[int, np.ndarray]:
    """For each k, the sum per token of the k largest softmax probabilities of ``logits``."""
    e = np.exp(logits - logits.max(-1, keepdims=True))
    p = e / e.sum(-1, keepdims=True)
    ordered = -np.sort(-p, -1)
    return {k: ordered[:, :k].sum(-1) for k in range(1, p.shape[-1])}


def _fused(case: Case, layer: int) -> Diagnosis | None:
    """The experts' output differs where the candidate records no routing (vLLM's and
    SGLang's FusedMoE: routing, experts and their sum in one module, called with the router's
    logits). With the router logits agreeing, the experts' output is measured against the
    reference's scaled per token by the top-k probabilities' sum, for each k: a match means
    the top-k weights are renormalized on one side only."""
    router = _pair(case, K.ROUTER, layer)
    logits = case.arrays(router) if router is not None else None
    out = case.arrays(case.first)
    if router is None or logits is None or out is None or not case.agrees(router):
        return None
    ref_logits = _as_2d(logits[0])
    ref, cand = _as_2d(out[0]), _as_2d(out[1])
    if ref.shape != cand.shape or ref.shape[0] != ref_logits.shape[0]:
        return None
    found = []
    for k, sums in _top_k_sums(ref_logits).items():
        for scale, how in ((sums, "not renormalized"), (1.0 / sums, "renormalized")):
            found.append((ev.rel_error(cand, ref * scale[:, None]), k, how, sums))
    err, k, how, sums = min(found, key=lambda f: f[0])
    if not case.explains(err):
        return None
    lo, hi = float(sums.min()), float(sums.max())
    if how == "not renormalized":
        title = (f"the experts' output is the reference's times each token's top-{k} routing "
                 f"weights' sum ({lo:.3g}-{hi:.3g}): the candidate does not renormalize the "
                 f"top-{k} weights where the reference does")
        checks = ["renormalize the top-k weights to sum to 1 where the config asks "
                  "(norm_topk_prob, the fused MoE's renormalize flag)"]
    else:
        title = (f"the experts' output is the reference's divided by each token's top-{k} "
                 f"routing weights' sum ({lo:.3g}-{hi:.3g}): the candidate renormalizes the "
                 f"top-{k} weights where the reference does not")
        checks = ["renormalize only where the config asks (norm_topk_prob, the fused MoE's "
                  "renormalize flag)"]
    evidence = [f"layer {layer}, step {case.first.step}: the router logits agree to "
                f"{fmt(ev.rel_error(*logits))}; the candidate records no routing of its own "
                "(its experts run as one module)",
                f"the candidate's experts' output against the reference's scaled per token by "
                f"that sum: relative L2 {fmt(err)} (unscaled {fmt(case.first.error)})"]
    return make("moe", title, checks, evidence, layer=layer, top_k=k, renormalized=how,
                residual=err, weight_sums=[float(x) for x in sums])


@rule("moe")
def moe(case: Case) -> Diagnosis | None:
    """Which tokens chose which experts, the router logits, the weights' sums, the experts."""
    role = case.role(case.first)
    op = role.op
    if role.layer is None or not (op in MOE_OPS or re.fullmatch(r"(shared_expert|experts)\..+",
                                                              op)):
        return None
    r = routing_of(case, role.layer)
    if r is None:
        return _fused(case, role.layer) if op == K.EXPERTS_OUT else None
    layer, bad = role.layer, case.good()
    logits = r.logit_error
    logit_line = (f"router logits agree to {fmt(logits)}" if logits <= max(bad, 1e-5)
                  else f"router logits differ (relative L2 {fmt(logits)})")
    evidence = [f"layer {layer}, step {case.first.step}: {r.ref_ids.shape[0]} tokens, top "
                f"{r.ref_ids.shape[1]} of {r.n_experts} experts; {logit_line}"]
    checks: list[str] = []
    flipped = r.flipped
    detail: dict[str, object] = {"layer": layer, "router_logits_error": logits,
                                 "tokens_flipped": flipped}
    if r.ref_weights is not None and r.cand_weights is not None:
        evidence.append(f"the weights sum to {_sums(r.cand_weights)} in the candidate and to "
                        f"{_sums(r.ref_weights)} in the reference")
        detail.update(ref_weight_sum=float(r.ref_weights.sum(-1).mean()),
                      cand_weight_sum=float(r.cand_weights.sum(-1).mean()))
    if flipped:
        shown = flipped[:3]
        groups: dict[tuple[str, str], list[int]] = {}
        for t in shown:
            key = (_experts(r.chosen("cand", t)), _experts(r.chosen("ref", t)))
            groups.setdefault(key, []).append(t)
        parts = [f"token{'s' if len(ts) > 1 else ''} {_tokens(ts)} chose experts {c} instead "
                 f"of {rf}" for (c, rf), ts in groups.items()]
        more = f" (and {len(flipped) - len(shown)} more tokens)" if len(flipped) > len(shown) \
            else ""
        title = "; ".join(parts) + more + f"; {logit_line}"
        shift = r.shift()
        if shift is not None:
            title += f"; the expert ids are {_SHIFTS.get(shift, f'shifted by {shift}')}"
            checks.append(f"an expert index off by {abs(shift)}: 1-based ids, an offset "
                          "added twice, the router's ids mapped to the wrong expert slots")
        elif r.ref_logits is not None and all(r.near_tie(t) for t in flipped):
            title += "; every flip is a near-tie of the reference's logits"
        if logits > max(bad, 1e-5):
            checks.append("the router's input or weight: the router logits already differ")
        checks.append("the top-k selection: ties, sorting, k itself")
        detail.update(shift=shift, choices=[{"token": t, "ref": sorted(r.chosen("ref", t)),
                                             "cand": sorted(r.chosen("cand", t))}
                                            for t in flipped[:16]])
        return make("moe", title, checks, evidence, **detail)

    # the same experts everywhere: their weights, then the experts themselves
    if op in (K.ROUTER, K.EXPERT_WEIGHTS) and r.ref_weights is not None \
            and r.cand_weights is not None:
        ref_sum, cand_sum = r.ref_weights.sum(-1), r.cand_weights.sum(-1)
        ref_one, cand_one = np.allclose(ref_sum, 1, atol=1e-3), np.allclose(cand_sum, 1, atol=1e-3)
        if ref_one and not cand_one:
            title = (f"every token chose the same experts, but the routing weights sum to "
                     f"{_sums(r.cand_weights)} where the reference's sum to 1: the top-k "
                     f"weights are not renormalized; {logit_line}")
            checks.append("renormalize the top-k weights to sum to 1 where the config asks "
                          "(norm_topk_prob)")
        elif cand_one and not ref_one:
            how = ("the candidate's weights are the softmax over the chosen experts' logits "
                   "alone: a softmax after top-k" if _softmax_of_chosen(r) else
                   "the candidate renormalizes where the config does not ask")
            title = (f"every token chose the same experts, but the routing weights sum to 1 "
                     f"where the reference's sum to {_sums(r.ref_weights)}: {how}; "
                     f"{logit_line}")
            checks.append("take the softmax over every expert's logit before top-k, and "
                          "renormalize only where the config asks (norm_topk_prob)")
        else:
            title = (f"every token chose the same experts with other weights (relative L2 "
                     f"{fmt(case.first.error)}); {logit_line}")
            checks.append("the softmax and scaling of the top-k weights (a routed scaling "
                          "factor, a bias in the selection only)")
        return make("moe", title, checks, evidence, **detail)

    experts = _per_expert(case, r)
    if experts:
        good = [e for e, _, err in experts if err <= max(bad, 1e-5)]
        worse = [(e, n, err) for e, n, err in experts if err > max(bad, 1e-5)]
        evidence.append("per expert that ran (rows, relative L2 of silu(gate)): " + ", ".join(
            f"{e}: {n}, {fmt(err)}" for e, n, err in experts))
        detail["experts"] = [{"expert": e, "rows": n, "error": err} for e, n, err in experts]
        if worse and op == "experts.gate_act":
            names = ", ".join(str(e) for e, _, _ in worse)
            title = (f"routing agrees; expert{'s' if len(worse) > 1 else ''} {names} "
                     f"differ{'' if len(worse) > 1 else 's'} (relative L2 "
                     f"{fmt(max(err for _, _, err in worse))}) while experts "
                     f"{', '.join(map(str, good)) or 'none'} agree")
            checks += [f"expert {worse[0][0]}'s weights: gate and up swapped, another "
                       "expert's slice, a fused gate_up_proj split the other way",
                       "the expert's quantization or layout"]
            return make("moe", title, checks, evidence, **detail)
    rows = _token_errors(case, K.EXPERTS_OUT, layer)
    if op == K.EXPERTS_OUT and rows is not None:
        off = [t for t, err in rows if err > max(bad, 1e-5)]
        title = (f"routing and every expert's activation agree; the experts' sum differs at "
                 f"token{'s' if len(off) > 1 else ''} {_tokens(off[:6])}: an expert's output "
                 "is lost or misplaced on its way to the sum")
        checks += ["a capacity limit that drops (token, expert) rows past an expert's share",
                   "the scatter back to tokens (index_add indices, the weights' order)"]
        detail["tokens"] = off
        return make("moe", title, checks, evidence, **detail)
    if op == K.MLP_OUT:
        out, shared = _pair(case, K.EXPERTS_OUT, layer), _pair(case, "shared_expert.out", layer)
        block = case.arrays(case.first)
        routed = case.arrays(out) if out is not None else None
        if block is not None and routed is not None and out is not None and \
                shared is not None and case.agrees(out) and case.agrees(shared) and \
                ev.rel_error(routed[0], block[1]) <= max(bad, 1e-5):
            title = ("routing, the routed experts and the shared expert agree, but the MLP "
                     "output is the routed experts' sum alone: the shared expert is left out")
            checks.append("add the (gated) shared expert's output to the routed experts' sum")
            return make("moe", title, checks, evidence, **detail)
    return None
