"""The case being diagnosed: the first divergence, its neighbours, and what each pair holds.

A ``Case`` reads a pair's two tensors back from the dumps (each at most once), finds the pairs
around the first divergence by the op they hold (``Role``: a canonical name from the pairing,
a name table, or a guess from the recorded names) and judges whether an explanation accounts
for the divergence.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any, Mapping, Sequence

import numpy as np

from ..align import kinds
from ..align.kinds import Kind
from ..align.roles import Role, role_of_canonical, role_of_name, table_role
from ..align.transforms import apply_transform, merged_meta, meta_size
from ..errors import LockstepError
from ..store.reader import Dump, Record
from ..textfmt import fmt
from . import evidence as ev
from .ops import INPUT_OF
from .pair_result import DRIFT_FACTOR, JUMP_FACTOR, PairResult

if TYPE_CHECKING:
    from .token_check import TokenCheck

__all__ = ["Case", "role_of", "is_logits", "label", "input_sentence"]


# -- what each pair is ------------------------------------------------------------------------
def role_of(p: PairResult) -> Role:
    """The pair's op: its canonical name, a name table's, or a guess from the names."""
    if p.canonical:
        return role_of_canonical(p.canonical)
    for name in (p.ref_name, p.cand_name):
        role = table_role(name)
        if role is not None:
            return role
    role = role_of_name(p.ref_name)
    return role if role.op else role_of_name(p.cand_name)


def is_logits(record: Record | str, meta: Mapping[str, Any]) -> bool:
    """Logit-like: named like logits in any engine (``lm_head``, ``:logits``,
    ``result_output``: align.kinds.named_kind), or named in the run metadata's ``logits``
    list."""
    name = record if isinstance(record, str) else record.name
    return kinds.named_kind(name) is Kind.LOGITS or name in meta.get("logits", ())


def label(p: PairResult) -> str:
    """The pair as a person reads it: its name (both names when they differ)."""
    name = p.ref_name or '"" (root)'
    return name if p.ref_name == p.cand_name else f"{name} ~ {p.cand_name}"


# -- the case being diagnosed -----------------------------------------------------------------
class Case:
    """The first divergence, its neighbours, and the two dumps to read them from."""

    def __init__(self, first: PairResult, results: Sequence[PairResult], ref: Dump, cand: Dump,
                 tokens: TokenCheck | None = None) -> None:
        self.first = first  #: the first divergence
        self.ref, self.cand = ref, cand
        self._cand_meta = merged_meta(ref, cand)  #: what the candidate's transforms read
        self.results = results  #: every compared pair, in step and capture order
        self.tokens = tokens  #: the chosen tokens of both runs (compare.tokens)
        self.step = [p for p in results if p.step == first.step]
        self._roles: dict[int, Role] = {}
        self._arrays: dict[tuple[int, int, int], tuple[np.ndarray, np.ndarray] | None] = {}
        self._seqs: dict[int, dict[int, Record]] = {}
        self._names: dict[tuple[int, str, int], PairResult] | None = None

    # reading
    def _record(self, dump: Dump, seq: int) -> Record | None:
        recs = dump.records
        if 0 <= seq < len(recs) and recs[seq].seq == seq:
            return recs[seq]
        index = self._seqs.setdefault(id(dump), {r.seq: r for r in recs})
        return index.get(seq)

    def read(self, dump: Dump, rec: Record | None, transform: str | None) -> np.ndarray | None:
        """One side's tensor in the compared layout (None without data or on a bad layout)."""
        if rec is None or not rec.has_data:
            return None
        meta = self._cand_meta if dump is self.cand else dump.meta
        try:
            return np.asarray(apply_transform(transform, dump.read(rec), meta),
                              dtype=np.float64)
        except LockstepError:
            return None

    def arrays(self, p: PairResult) -> tuple[np.ndarray, np.ndarray] | None:
        """(reference, candidate) of a pair, as compared."""
        key = (p.step, p.ref_seq, p.cand_seq)
        if key not in self._arrays:
            r = self.read(self.ref, self._record(self.ref, p.ref_seq), p.ref_transform)
            c = self.read(self.cand, self._record(self.cand, p.cand_seq), p.cand_transform)
            self._arrays[key] = None if r is None or c is None else (r, c)
        return self._arrays[key]

    def ref_record(self, p: PairResult) -> Record | None:
        """The reference's record of a pair."""
        return self._record(self.ref, p.ref_seq)

    def cand_record(self, p: PairResult) -> Record | None:
        """The candidate's record of a pair."""
        return self._record(self.cand, p.cand_seq)

    # finding neighbours
    def role(self, p: PairResult) -> Role:
        """The op a pair holds (see ``role_of``), worked out once."""
        key = id(p)
        if key not in self._roles:
            self._roles[key] = role_of(p)
        return self._roles[key]

    def find(self, ops: Sequence[str], layer: int | None, *, step: int | None = None,
             before: bool = True) -> PairResult | None:
        """The last pair of ``step`` (the first divergence's) holding one of ``ops`` (in
        preference order) at ``layer``, captured before the first divergence."""
        step = self.first.step if step is None else step
        pairs = self.step if step == self.first.step else [p for p in self.results
                                                           if p.step == step]
        for op in ops:
            hits = [p for p in pairs if self.role(p).op == op and self.role(p).layer == layer
                    and not math.isnan(p.error)
                    and (not before or step != self.first.step
                         or p.ref_seq < self.first.ref_seq)]
            if hits:
                return hits[-1]
        return None

    def same_name(self, p: PairResult, step: int) -> PairResult | None:
        """The pair of the same names and call at another step."""
        if self._names is None:
            self._names = {(q.step, q.ref_name, q.call): q for q in self.results}
        q = self._names.get((step, p.ref_name, p.call))
        return q if q is not None and q.cand_name == p.cand_name else None

    def layer_input(self, layer: int) -> PairResult | None:
        """The pair holding what layer ``layer`` takes in: the layer before's output, or the
        embedding for layer 0 (captured before the first divergence)."""
        return self.find((Kind.OUT,), layer - 1) if layer else self.find((Kind.EMBED,), None)

    def input_of(self, p: PairResult) -> PairResult | None:
        """The pair holding the op's input (by its role), else the pair captured just before."""
        role = self.role(p)
        hit = None
        if role.op == Kind.ATTN_NORM:
            hit = (self.layer_input(role.layer) if role.layer else None) or \
                self.find((Kind.EMBED,), None)
        elif role.op == Kind.FINAL_NORM:  # the last layer's output, never an earlier one's
            known = [x for x in (self.role(q).layer for q in self.step) if x is not None]
            hit = self.find((Kind.OUT,), max(known)) if known else None
            if hit is None:
                return None
        elif role.op in INPUT_OF:
            ops = INPUT_OF[role.op]
            hit = self.find(ops, role.layer) or (self.find(ops, None) if role.layer is not None
                                                 else None)
        if hit is not None:
            return hit
        earlier = [q for q in self.step if q.ref_seq < p.ref_seq and not math.isnan(q.error)]
        return earlier[-1] if earlier else None

    # judging
    def good(self, p: PairResult | None = None) -> float:
        """The error below which an explanation accounts for the divergence."""
        p = p or self.first
        return max(DRIFT_FACTOR * p.noise, 2.0 * p.inherited, 1e-6)

    def reproduces(self, fit: float) -> bool:
        """A re-enactment from the reference's own inputs that leaves this error against the
        reference reproduces it: to 1e-4, or to a hundredth of the divergence (llama.cpp's
        float16 KV cache leaves 3e-4 against attention recomputed in float32)."""
        return fit <= max(1e-4, self.first.error / 100)

    def explains(self, err: float) -> bool:
        """An explanation leaving this error accounts for the first divergence's."""
        return err <= self.good() and err * JUMP_FACTOR <= self.first.error

    def scale_of(self, arrays: tuple[np.ndarray, np.ndarray] | None) -> float | None:
        """s when the candidate is s times the reference and that accounts for the divergence."""
        if arrays is None:
            return None
        s, residual = ev.fit_scale(*arrays)
        return s if self.explains(residual) else None

    @staticmethod
    def agrees(p: PairResult) -> bool:
        """The pair is within what precision explains."""
        return not math.isnan(p.error) and p.error <= max(DRIFT_FACTOR * p.noise, p.tol)

    @property
    def prefill_ok(self) -> bool:
        """Every pair of step 0 (the prefill) agrees."""
        return all(self.agrees(p) for p in self.results if p.step == 0 and
                   not math.isnan(p.error))

    def meta(self, symbol: str) -> int | None:
        """A model size from either run's metadata (``head_dim``, ``n_heads``, ...)."""
        return meta_size(self._cand_meta, symbol)  # (the reference's where both give one)

    def head_dim(self, r: np.ndarray | None = None) -> int | None:
        """head_dim from the metadata, else the last dim of a per-head tensor."""
        d = self.meta("head_dim")
        if d is None and r is not None and self.role(self.first).op in (
                Kind.Q_NORM, Kind.K_NORM, Kind.Q_ROPE, Kind.K_ROPE) and ev.squeeze(r).ndim >= 2:
            d = int(ev.squeeze(r).shape[-1])
        return d


def input_sentence(case: Case, p: PairResult) -> tuple[str, PairResult | None]:
    """A sentence on the input of ``p`` (whether it agrees), and that input's pair."""
    inp = case.input_of(p)
    if inp is None:
        return "no input of it was captured", None
    state = "agrees" if case.agrees(inp) else "already differs"
    return f"its input {label(inp)} {state} (relative L2 {fmt(inp.error)})", inp
