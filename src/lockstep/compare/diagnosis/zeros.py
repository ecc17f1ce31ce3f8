"""The ``zeros`` rule: the candidate is exactly zero (all of it, or a quarter) where the
reference is not."""

from __future__ import annotations

from ...align.kinds import Kind as K
from ...textfmt import pct
from .. import evidence as ev
from ..case import Case, input_sentence, label
from .model import Diagnosis, make, rule

__all__ = ["zeros"]

@rule("zeros")
def zeros(case: Case) -> Diagnosis | None:
    """The candidate exactly zero where the reference is not (all of it, or a quarter)."""
    f = case.first
    arrays = case.arrays(f)
    if arrays is None or case.role(f).op in (K.INPUT_IDS, K.POSITIONS):
        return None
    r, c = arrays
    zeroed, nonzero = ev.zeroed(r, c)
    if not nonzero or zeroed < 0.25 * nonzero:
        return None
    every = bool(ev.value_range(c).zero)
    what = "is all zeros" if every else f"is zero at {pct(zeroed, nonzero)} of the elements"
    evidence = [f"{zeroed} of the {nonzero} elements that are non-zero in the reference are "
                f"exactly 0 in the candidate ({label(f)}, step {f.step})"]
    sentence, inp = input_sentence(case, f)
    evidence.append(sentence)
    checks = ([f"the weights of {label(f)} were never loaded or copied to the device "
               "(`lockstep weights`)",
               "the kernel never wrote its output: a failed or skipped launch, a wrong output "
               "pointer, the result read before the kernel finished"] if every else
              ["the kernel writes only part of its output: its grid or loop bounds (heads, "
               "tiles, rows), a zero-initialised buffer only partly filled",
               f"part of the weights of {label(f)} not loaded (missing rows or shards)"])
    return make("zeros", f"the candidate's {label(f)} {what} where the reference's is not",
                checks, evidence, zeroed=zeroed, nonzero_in_reference=nonzero,
                all_zero=every, input=label(inp) if inp else None)
