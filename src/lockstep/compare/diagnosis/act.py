"""The ``act`` rule: the gated MLP's activation re-enacted from the reference's own gate and
up projections, to say what the candidate computed instead: gate and up swapped
(act(up) * gate), another activation (GELU where the model uses SiLU, or the other way), no
activation, or the up projection left out.

The reference's gate and up outputs are read whether or not the candidate recorded its own:
an engine that records only the down projection's input (silu(gate) * up) is diagnosed too."""

from __future__ import annotations

import math
from typing import Callable

import numpy as np

from ...align.kinds import Kind as K
from ...align.roles import role_of_name
from ...textfmt import fmt
from .. import evidence as ev
from ..case import Case, label
from .model import Diagnosis, make, rule

__all__ = ["act"]

_ROWS = 64  # token rows re-enacted at most


def _silu(x: np.ndarray) -> np.ndarray:
    return x / (1.0 + np.exp(-x))


def _gelu_tanh(x: np.ndarray) -> np.ndarray:
    return 0.5 * x * (1.0 + np.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x ** 3)))


_ERF = np.frompyfunc(math.erf, 1, 1)


def _gelu(x: np.ndarray) -> np.ndarray:
    return 0.5 * x * (1.0 + np.asarray(_ERF(x / math.sqrt(2.0)), dtype=np.float64))


#: the activations a gated MLP uses, by the name its config gives
ACTIVATIONS: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    "silu": _silu, "gelu_tanh": _gelu_tanh, "gelu": _gelu}


def _gate_and_up(case: Case, layer: int, n: int) -> tuple[np.ndarray, np.ndarray] | None:
    """The reference's gate and up outputs at the first divergence's step and ``layer``, as
    (rows, n_ff), when it recorded both."""
    found: dict[str, np.ndarray] = {}
    for rec in case.ref.in_step(case.first.step):
        role = role_of_name(rec.name)
        if role.layer == layer and role.op in (K.GATE, K.UP) and rec.numel == n:
            values = case.read(case.ref, rec, None)
            if values is not None:
                found.setdefault(role.op, values)
    if K.GATE not in found or K.UP not in found:
        return None
    return found[K.GATE], found[K.UP]


@rule("act")
def act(case: Case) -> Diagnosis | None:
    f = case.first
    role = case.role(f)
    arrays = case.arrays(f)
    if role.op != K.ACT or role.layer is None or arrays is None:
        return None
    ref_act, cand_act = arrays
    found = _gate_and_up(case, role.layer, ref_act.size)
    if found is None:
        return None
    width = ev.squeeze(ref_act).shape[-1]
    gate, up, ref_act, cand_act = (a.reshape(-1, width) for a in (*found, ref_act, cand_act))
    rows = ev.spaced_rows(len(gate), _ROWS)
    gate, up, ref_act, cand_act = gate[rows], up[rows], ref_act[rows], cand_act[rows]
    fits = {name: ev.rel_error(ref_act, fn(gate) * up) for name, fn in ACTIVATIONS.items()}
    own = min(fits, key=lambda name: fits[name])
    if not case.reproduces(fits[own]):
        return None
    fn = ACTIVATIONS[own]
    # (name, what the candidate computes, title, its values, what to check)
    variants = [("swapped", f"{own}(up) * gate", f"gate and up swapped: the candidate "
                 f"computes {own}(up) * gate where the reference computes {own}(gate) * up",
                 fn(up) * gate, ["which half of a fused gate_up projection is the gate: "
                                 "transformers' gate_up_proj holds gate first, then up",
                                 "the order of the gate and up weights as loaded (w1/w3 in "
                                 "Meta's naming: w1 is the gate)"])]
    variants += [(name, f"{name}(gate) * up", f"the activation is {name} where the model's "
                  f"is {own}", other(gate) * up,
                  [f"the activation function: the config's hidden_act ({own}), not {name}"])
                 for name, other in ACTIVATIONS.items() if name != own]
    variants += [("none", "gate * up", "no activation: the candidate computes gate * up",
                  gate * up, [f"the {own} applied to the gate projection's output"]),
                 ("no_up", f"{own}(gate)", f"the up projection is left out: the candidate "
                  f"computes {own}(gate)", fn(gate),
                  ["the product with the up projection's output"])]
    for name, formula, title, values, checks in variants:
        err = ev.rel_error(cand_act, values)
        if not case.explains(err):
            continue
        evidence = [f"{own}(gate) * up from the reference's own gate and up projections of "
                    f"layer {role.layer} reproduces its {label(f)}: relative L2 "
                    f"{fmt(fits[own])}", f"{formula} from them reproduces the candidate's: "
                    f"relative L2 {fmt(err)} (unchanged: {fmt(f.error)})"]
        return make("act", f"{title} (layer {role.layer}, step {f.step})", checks, evidence,
                    layer=role.layer, activation=own, candidate=name, error_after=err)
    return None
