"""The dtypes a dump stores, their sizes, and their conversion to float for comparison.

Every dtype is stored as its raw little-endian bytes. numpy has no bfloat16 or fp8, so those
are read as unsigned integers and decoded here, exactly (bf16 is the top half of a float32;
fp8 is decoded through a 256-entry table).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = ["DType", "DTYPES", "lookup", "to_float", "FLOAT_KINDS"]


@dataclass(frozen=True)
class DType:
    """One storable dtype."""

    name: str  #: the name in the dump index, torch's spelling
    itemsize: int  #: bytes per element
    storage: str  #: numpy dtype the raw bytes are read as ("<u2" for bfloat16)
    is_float: bool  #: a floating-point type (compared by error), else compared exactly


def _fp8_table(exp_bits: int, man_bits: int, bias: int, *, fn: bool) -> np.ndarray:
    """Decode every byte of an fp8 format to float32.

    ``fn`` is the "finite" variant (e4m3fn): no infinities, only S.1111.111 is NaN.
    Otherwise (e5m2) an all-ones exponent means Inf (mantissa 0) or NaN, as in IEEE.
    """
    table = np.empty(256, dtype=np.float32)
    exp_max = (1 << exp_bits) - 1
    for byte in range(256):
        sign = -1.0 if byte & 0x80 else 1.0
        exp = (byte >> man_bits) & exp_max
        man = byte & ((1 << man_bits) - 1)
        if fn and exp == exp_max and man == (1 << man_bits) - 1:
            value = float("nan")
        elif not fn and exp == exp_max:
            value = sign * float("inf") if man == 0 else float("nan")
        elif exp == 0:
            value = sign * man / (1 << man_bits) * 2.0 ** (1 - bias)
        else:
            value = sign * (1 + man / (1 << man_bits)) * 2.0 ** (exp - bias)
        table[byte] = value
    return table


_E4M3FN = _fp8_table(4, 3, 7, fn=True)
_E5M2 = _fp8_table(5, 2, 15, fn=False)

DTYPES: dict[str, DType] = {
    d.name: d
    for d in [
        DType("float64", 8, "<f8", True),
        DType("float32", 4, "<f4", True),
        DType("float16", 2, "<f2", True),
        DType("bfloat16", 2, "<u2", True),
        DType("float8_e4m3fn", 1, "u1", True),
        DType("float8_e5m2", 1, "u1", True),
        DType("int64", 8, "<i8", False),
        DType("int32", 4, "<i4", False),
        DType("int16", 2, "<i2", False),
        DType("int8", 1, "i1", False),
        DType("uint8", 1, "u1", False),
        DType("uint16", 2, "<u2", False),
        DType("uint32", 4, "<u4", False),
        DType("uint64", 8, "<u8", False),
        DType("bool", 1, "u1", False),
    ]
}

#: dtypes compared by error rather than exactly
FLOAT_KINDS = frozenset(name for name, d in DTYPES.items() if d.is_float)


def lookup(name: str) -> DType | None:
    """The dtype called ``name``, or None when the format does not know it."""
    return DTYPES.get(name)


def to_float(raw: np.ndarray, dtype: str) -> np.ndarray:
    """Convert raw stored elements of ``dtype`` to a float array for comparison.

    float32 and float64 are returned as they are (read-only when ``raw`` is); integers wider
    than 16 bits become float64 (exact: float32 holds integers only up to 2**24); everything
    else becomes float32.
    """
    if dtype == "bfloat16":
        return (raw.astype(np.uint32) << 16).view(np.float32)
    if dtype == "float8_e4m3fn":
        return _E4M3FN[raw]
    if dtype == "float8_e5m2":
        return _E5M2[raw]
    # (a float32 or float64 dump is read where it lies: no copy of a memory-mapped tensor)
    if dtype in ("float64", "int64", "uint64", "int32", "uint32"):
        return raw.astype(np.float64, copy=False)
    return raw.astype(np.float32, copy=False)
