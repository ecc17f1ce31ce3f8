"""Tolerances on the relative L2 error, aware of dtype and quantization, overridable.

Each pair gets two: ``match``, the error allowed to call the two sides equal, from the more
precise side (float64 counts as float32: a float32 run matches its float64 twin), and
``noise``, the error the less precise side can explain by rounding or quantization alone. A
bfloat16 candidate against a float32 reference matches to 1e-4 and drifts up to bfloat16's
noise. Run metadata that says a side computed in lower precision (``compute_dtype``) or on
quantized weights (``quantization``) counts as that side's precision.
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass, field, replace
from typing import Any, Iterable, Mapping

__all__ = ["Tolerance", "Tolerances", "DTYPE_RTOL", "QUANTIZED_RTOL"]

#: default tolerance on relative L2 error, per dtype (ints and bools compare exactly)
DTYPE_RTOL: dict[str, float] = {
    "float64": 1e-9,
    "float32": 1e-4,
    "float16": 4e-3,
    "bfloat16": 3e-2,
    "float8_e4m3fn": 0.125,
    "float8_e5m2": 0.25,
}
#: weights quantized to 8 bits or fewer (GGUF Q4/Q8, int8, ...)
QUANTIZED_RTOL = 5e-2


@dataclass(frozen=True)
class Tolerance:
    """The two thresholds one pair is held to (relative L2 error)."""

    match: float  #: at or below: the two sides agree to the better side's precision
    noise: float  #: at or below: explained by the worse side's precision or quantization


def _side_rtol(dtype: str, meta: Mapping[str, Any]) -> float | None:
    tols = [DTYPE_RTOL.get(dtype), DTYPE_RTOL.get(str(meta.get("compute_dtype", "")))]
    if meta.get("quantization"):
        tols.append(QUANTIZED_RTOL)
    known = [t for t in tols if t is not None]
    return max(known) if known else None


@dataclass(frozen=True)
class Tolerances:
    """What counts as a match. ``rtol`` overrides every default; ``per_name`` maps glob
    patterns on reference names to a tolerance, and the first pattern that matches wins."""

    rtol: float | None = None
    per_name: tuple[tuple[str, float], ...] = field(default=())

    @classmethod
    def parse(cls, rtol: float | None, rules: list[str] | None) -> Tolerances:
        """From the CLI: ``--rtol X`` and ``--tol 'PATTERN=X'`` (repeatable)."""
        from ..errors import UsageError

        per_name = []
        for rule in rules or []:
            pattern, sep, value = rule.rpartition("=")
            try:
                per_name.append((pattern, float(value)))
            except ValueError:
                raise UsageError(f"--tol {rule!r}: expected PATTERN=NUMBER, "
                                 "e.g. --tol 'model.layers.*.mlp*=1e-3'") from None
            if not sep or not pattern:
                raise UsageError(f"--tol {rule!r}: expected PATTERN=NUMBER")
        return cls(rtol=rtol, per_name=tuple(per_name))

    def with_patterns(self, per_name: Iterable[tuple[str, float]]) -> Tolerances:
        """These tolerances with more (glob, tolerance) patterns after their own, which keep
        precedence: a mapping file's tolerances after the command line's ``--tol``."""
        return replace(self, per_name=self.per_name + tuple(per_name))

    def for_pair(self, name: str, ref_dtype: str, cand_dtype: str,
                 ref_meta: Mapping[str, Any], cand_meta: Mapping[str, Any]) -> Tolerance:
        """The tolerance for one pair; 0.0 means the two must be equal."""
        for pattern, value in self.per_name:
            if fnmatch.fnmatchcase(name, pattern):
                return Tolerance(value, value)
        if self.rtol is not None:
            return Tolerance(self.rtol, self.rtol)
        sides = [t for t in (_side_rtol(ref_dtype, ref_meta), _side_rtol(cand_dtype, cand_meta))
                 if t is not None]
        if ref_dtype not in DTYPE_RTOL and cand_dtype not in DTYPE_RTOL:
            return Tolerance(0.0, 0.0)  # integers and bools: exact
        match = max(min(sides), DTYPE_RTOL["float32"])
        return Tolerance(match, max(max(sides), match))
