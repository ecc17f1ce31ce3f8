"""A dump writer written from docs/format.md alone: json, struct and os, no numpy, no lockstep.

It exists so that the tests check the *format*, not just that lockstep agrees with itself: if
lockstep reads what this writes, a C or Rust engine that follows the same page can do the same.

    w = IndependentWriter(path, meta={"engine": "mine"})
    w.tensor("model.layers.0.mlp", 0, "bfloat16", [2, 3], [0.1, 0.2, 0.3, 0.4, 0.5, 0.6])
    w.meta(prompt_token_ids=[1, 2, 3])
    w.end()

Values are given flat, in row-major order (the last dimension varies fastest).
"""

from __future__ import annotations

import json
import math
import os
import struct

__all__ = ["IndependentWriter", "ITEMSIZE", "encode", "decode", "stats_of", "e4m3fn_byte",
           "bf16_bits"]

# dtype name -> (bytes per element, struct code for one little-endian element or None)
_CODES = {
    "float64": (8, "<d"), "float32": (4, "<f"), "float16": (2, "<e"), "bfloat16": (2, None),
    "float8_e4m3fn": (1, None), "float8_e5m2": (1, None),
    "int64": (8, "<q"), "int32": (4, "<i"), "int16": (2, "<h"), "int8": (1, "<b"),
    "uint64": (8, "<Q"), "uint32": (4, "<I"), "uint16": (2, "<H"), "uint8": (1, "<B"),
    "bool": (1, "<B"),
}
ITEMSIZE = {name: size for name, (size, _) in _CODES.items()}


# -- the two 16-bit / 8-bit float formats Python's struct does not know ---------------------
def bf16_bits(x: float, *, truncate: bool = False) -> int:
    """bfloat16 = the top 16 bits of the float32; rounded to nearest-even unless ``truncate``."""
    bits = struct.unpack("<I", struct.pack("<f", x))[0]
    if math.isnan(x):
        return (bits >> 16) | 0x0040  # keep it a (quiet) NaN after dropping the low half
    if truncate:
        return bits >> 16
    return ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16) & 0xFFFF


def _e4m3fn_value(byte: int) -> float:
    """float8_e4m3fn: sign, 4 exponent bits (bias 7), 3 mantissa bits; no Inf; S.1111.111 NaN."""
    sign = -1.0 if byte & 0x80 else 1.0
    exp, man = (byte >> 3) & 0xF, byte & 0x7
    if exp == 0xF and man == 0x7:
        return math.nan
    if exp == 0:
        return sign * man / 8 * 2.0 ** -6
    return sign * (1 + man / 8) * 2.0 ** (exp - 7)


def _e5m2_value(byte: int) -> float:
    """float8_e5m2: sign, 5 exponent bits (bias 15), 2 mantissa bits; IEEE Inf and NaN."""
    sign = -1.0 if byte & 0x80 else 1.0
    exp, man = (byte >> 2) & 0x1F, byte & 0x3
    if exp == 0x1F:
        return sign * math.inf if man == 0 else math.nan
    if exp == 0:
        return sign * man / 4 * 2.0 ** -14
    return sign * (1 + man / 4) * 2.0 ** (exp - 15)


_E4M3FN_POS = [_e4m3fn_value(b) for b in range(0x7F)]  # 0x00..0x7E, every finite magnitude


def e4m3fn_byte(x: float) -> int:
    """Round ``x`` to the nearest float8_e4m3fn (ties to even), saturating at +-448."""
    if math.isnan(x):
        return 0x7F
    sign = 0x80 if math.copysign(1.0, x) < 0 else 0
    a = abs(x)
    best = 0
    for code, value in enumerate(_E4M3FN_POS):
        d, bd = abs(value - a), abs(_E4M3FN_POS[best] - a)
        if d < bd or (d == bd and code % 2 == 0 and best % 2 == 1):
            best = code
    return sign | best


def _e5m2_byte(x: float) -> int:
    """float8_e5m2 is the top byte of a float16; round the half's low byte to nearest-even."""
    if math.isnan(x):
        return 0x7E
    try:
        half = struct.unpack("<H", struct.pack("<e", x))[0]
    except OverflowError:
        half = 0xFC00 if x < 0 else 0x7C00
    if (half & 0x7C00) == 0x7C00:
        return half >> 8
    return (half + 0x7F + ((half >> 8) & 1)) >> 8


# -- whole tensors ---------------------------------------------------------------------------
def encode(dtype: str, values: list, *, truncate_bf16: bool = False) -> bytes:
    """The data.bin bytes of ``values`` (flat, row-major) stored as ``dtype``, little-endian."""
    size, code = _CODES[dtype]
    if dtype == "bfloat16":
        return b"".join(struct.pack("<H", bf16_bits(float(v), truncate=truncate_bf16))
                        for v in values)
    if dtype == "float8_e4m3fn":
        return bytes(e4m3fn_byte(float(v)) for v in values)
    if dtype == "float8_e5m2":
        return bytes(_e5m2_byte(float(v)) for v in values)
    if dtype == "bool":
        return bytes(1 if v else 0 for v in values)
    return b"".join(struct.pack(code, v) for v in values)


def decode(dtype: str, raw: bytes) -> list:
    """The values stored in ``raw``: floats for float dtypes, ints otherwise."""
    size, code = _CODES[dtype]
    if dtype == "bfloat16":
        return [struct.unpack("<f", struct.pack("<I", h << 16))[0]
                for (h,) in struct.iter_unpack("<H", raw)]
    if dtype == "float8_e4m3fn":
        return [_e4m3fn_value(b) for b in raw]
    if dtype == "float8_e5m2":
        return [_e5m2_value(b) for b in raw]
    return [v for (v,) in struct.iter_unpack(code, raw)]


def stats_of(values: list) -> dict:
    """The stats object: min/max/mean/std/abs_max over finite elements, nan/inf/zero counts."""
    floats = [float(v) for v in values]
    finite = [v for v in floats if math.isfinite(v)]
    out = {"min": None, "max": None, "mean": None, "std": None, "abs_max": None,
           "nan": sum(1 for v in floats if math.isnan(v)),
           "inf": sum(1 for v in floats if math.isinf(v)),
           "zero": sum(1 for v in floats if v == 0.0)}
    if finite:
        mean = math.fsum(finite) / len(finite)
        out.update(min=min(finite), max=max(finite), mean=mean,
                   std=math.sqrt(math.fsum((v - mean) ** 2 for v in finite) / len(finite)),
                   abs_max=max(abs(min(finite)), abs(max(finite))))
    return out


class IndependentWriter:
    """Writes index.jsonl + data.bin the way docs/format.md says, one record at a time.

    ``align`` pads each tensor's offset to a multiple (lockstep uses 64; 1 means no padding,
    which readers must accept). Every data write is flushed before the index line that points
    at it, and every index line is flushed as it is written: kill it at any moment and the dump
    is readable.
    """

    def __init__(self, path: str, meta: dict | None = None, *, align: int = 1) -> None:
        os.makedirs(path, exist_ok=True)
        self.path = path
        self.align = align
        self.seq = 0
        self.offset = 0
        self._data = open(os.path.join(path, "data.bin"), "wb")
        self._index = open(os.path.join(path, "index.jsonl"), "wb")
        self._line({"type": "header", "format": "lockstep-dump", "version": 1,
                    "meta": meta or {}})

    def _line(self, obj: dict) -> None:
        self._index.write(json.dumps(obj, allow_nan=False).encode("utf-8") + b"\n")
        self._index.flush()

    def tensor(self, name: str, step: int, dtype: str, shape: list, values: list | None = None,
               *, raw: bytes | None = None, call: int = 0, data: bool = True,
               stats: dict | str | None = "auto", truncate_bf16: bool = False,
               **extra: object) -> int:
        """Append one record; ``raw`` gives the bytes directly, ``data=False`` keeps stats only."""
        numel = 1
        for n in shape:
            numel *= n
        if raw is None:
            raw = encode(dtype, list(values), truncate_bf16=truncate_bf16)
        if len(raw) != numel * ITEMSIZE[dtype]:
            raise ValueError(f"{name}: {len(raw)} bytes for {dtype}{shape}")
        if stats == "auto":
            stats = stats_of(decode(dtype, raw))
        offset = nbytes = None
        if data:
            pad = -self.offset % self.align
            self._data.write(b"\0" * pad)
            offset, nbytes = self.offset + pad, len(raw)
            self._data.write(raw)
            self._data.flush()  # the bytes reach the file before the line that points at them
            self.offset = offset + nbytes
        record = {"type": "tensor", "name": name, "step": step, "seq": self.seq, "call": call,
                  "dtype": dtype, "shape": list(shape), "offset": offset, "nbytes": nbytes,
                  "stats": stats}
        record.update(extra)
        self._line(record)
        self.seq += 1
        return self.seq - 1

    def meta(self, **meta: object) -> None:
        self._line({"type": "meta", "meta": meta})

    def end(self, error: str | None = None) -> None:
        """Mark the dump complete; ``error`` says the recorded program raised."""
        line = {"type": "end", "records": self.seq}
        if error is not None:
            line["error"] = error
        self._line(line)
        self.abandon()

    def abandon(self) -> None:
        """Close the files without an end line: the dump stays incomplete, as after a crash."""
        self._data.close()
        self._index.close()
