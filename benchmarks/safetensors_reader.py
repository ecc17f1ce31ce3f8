"""lockstep's own safetensors reader against the ``safetensors`` library (numpy framework).

Why lockstep keeps a reader of its own (``lockstep.checkpoint.safetensors_file``) beside the
library it depends on: this prints the figures that decide it.

1. Time and peak RSS, each in a fresh child process (``ru_maxrss``), on a ~1 GB file of
   float32 tensors (one of 512 MiB, an embedding's size, and 64 MiB ones): reading the
   header, then every tensor (summed, so every element is touched). The library is read
   whole tensor by tensor (``get_tensor``) and by slices of rows (``get_slice``).
2. bfloat16: whether each reads it without torch (the core is numpy only).
3. The message each gives on corrupt and hostile files.

    python benchmarks/safetensors_reader.py [--gib 1.0]

The file is in the page cache after being written: this measures the readers, not the disk.
"""

from __future__ import annotations

import argparse
import json
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

BIG = 512 << 20  #: bytes of the one large tensor
SMALL = 64 << 20  #: bytes of each of the others
PIECE = 1 << 22  #: elements written at a time
ROWS = 4096  #: rows a library slice reads at a time (of 4096 float32: 64 MiB)

CHILD = r"""
import json, resource, sys, time
import numpy as np
mode, path = sys.argv[1], sys.argv[2]
from lockstep.checkpoint.safetensors_file import SafetensorsFile  # imports before the clock
from safetensors import safe_open
t0 = time.perf_counter()
total, tensors = 0.0, 0
if mode.startswith("lockstep"):
    f = SafetensorsFile(path)
    for src in f.tensors():
        tensors += 1
        if mode == "lockstep-read":
            for chunk in src.chunks():
                total += float(chunk.sum(dtype=np.float64))
else:
    with safe_open(path, framework="np") as f:
        for name in f.keys():
            tensors += 1
            sl = f.get_slice(name)
            shape = sl.get_shape()
            if mode == "library-read":
                total += float(f.get_tensor(name).sum(dtype=np.float64))
            elif mode == "library-slices":
                for lo in range(0, shape[0], ROWS):
                    total += float(sl[lo:lo + ROWS].sum(dtype=np.float64))
dt = time.perf_counter() - t0
print(json.dumps({"seconds": dt, "tensors": tensors, "total": total,
                  "maxrss_kb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss}))
""".replace("ROWS", str(ROWS))


def _header(entries: dict[str, tuple[str, list[int], int, int]]) -> bytes:
    obj = {k: {"dtype": d, "shape": s, "data_offsets": [b, e]} for k, (d, s, b, e) in
           entries.items()}
    raw = json.dumps(obj).encode()
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw


def write_big(path: Path, total_bytes: int) -> int:
    """float32 tensors: one of BIG bytes, then SMALL ones up to ``total_bytes``."""
    sizes = [BIG] + [SMALL] * max(1, (total_bytes - BIG) // SMALL)
    entries, offset = {}, 0
    for i, size in enumerate(sizes):
        elems = size // 4
        entries[f"model.t{i}.weight"] = ("F32", [elems // 4096, 4096], offset, offset + size)
        offset += size
    rng = np.random.default_rng(0)
    with open(path, "wb") as f:
        f.write(_header(entries))
        for size in sizes:
            elems = size // 4
            for lo in range(0, elems, PIECE):
                f.write((rng.standard_normal(min(PIECE, elems - lo), dtype=np.float32)
                         * 0.02).tobytes())
    return offset


def corrupt_files(tmp: Path) -> dict[str, Path]:
    """Small files, each wrong in one way."""
    good = np.arange(16, dtype=np.float32).tobytes()
    cases = {
        "truncated data": _header({"w": ("F32", [4, 4], 0, 64)}) + good[:40],
        "header length past the end": struct.pack("<Q", 1 << 40) + b"{}",
        "header not JSON": struct.pack("<Q", 8) + b"{not js}" + good,
        "unknown dtype": _header({"w": ("F33", [4, 4], 0, 64)}) + good,
        "overlapping tensors": _header({"a": ("F32", [4, 4], 0, 64),
                                        "b": ("F32", [4, 4], 32, 96)}) + good + good,
        "shape and offsets disagree": _header({"w": ("F32", [5, 4], 0, 64)}) + good,
        "absurd shape": _header({"w": ("F32", [1 << 40, 1 << 40], 0, 64)}) + good,
        "8 bytes only": struct.pack("<Q", 0),
    }
    out = {}
    for name, raw in cases.items():
        p = tmp / (name.replace(" ", "_") + ".safetensors")
        p.write_bytes(raw)
        out[name] = p
    return out


def lockstep_message(path: Path) -> str:
    from lockstep.checkpoint.errors import CheckpointError
    from lockstep.checkpoint.safetensors_file import SafetensorsFile

    try:
        for src in SafetensorsFile(path).tensors():
            for _ in src.chunks():
                pass
    except CheckpointError as exc:
        return exc.reason + (f" [tensor {exc.tensor!r}]" if exc.tensor else "")
    return "(read without an error)"


def library_message(path: Path) -> str:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="np") as f:
            for name in f.keys():  # noqa: SIM118 (safe_open is not a dict: no iteration)
                f.get_tensor(name)
    except Exception as exc:  # the library raises SafetensorError, OSError, TypeError...
        return f"{type(exc).__name__}: {str(exc)[:150]}"
    return "(read without an error)"


def bf16_check(tmp: Path) -> tuple[str, str]:
    path = tmp / "bf16.safetensors"
    path.write_bytes(_header({"w": ("BF16", [2, 2], 0, 8)}) + np.array(
        [0x3F80, 0x4000, 0xBF80, 0x0000], dtype=np.uint16).tobytes())
    from lockstep.checkpoint.safetensors_file import SafetensorsFile

    (src,) = SafetensorsFile(path).tensors()
    ours = f"reads it: {np.concatenate(list(src.chunks())).tolist()}"
    return ours, library_message(path)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--gib", type=float, default=1.0, help="file size in GiB (default 1)")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        path = tmp / "big.safetensors"
        t0 = time.perf_counter()
        size = write_big(path, int(args.gib * (1 << 30)))
        print(f"wrote {size / 1e6:.0f} MB of float32 (one {BIG >> 20} MiB tensor, the others "
              f"{SMALL >> 20} MiB) in {time.perf_counter() - t0:.1f} s")
        print(f"{'reader':<34} {'ms':>9} {'MB/s':>7} {'peak RSS MB':>12}")
        for mode, label in (("lockstep-header", "lockstep, header"),
                            ("library-header", "library, header"),
                            ("lockstep-read", "lockstep, every tensor (chunks)"),
                            ("library-read", "library, every tensor (get_tensor)"),
                            ("library-slices", f"library, slices of {ROWS} rows")):
            res = json.loads(subprocess.run([sys.executable, "-c", CHILD, mode, str(path)],
                                            check=True, capture_output=True,
                                            text=True).stdout)
            rate = "" if mode.endswith("header") else f"{size / 1e6 / res['seconds']:.0f}"
            print(f"{label:<34} {res['seconds'] * 1e3:>9.2f} {rate:>7} "
                  f"{res['maxrss_kb'] / 1024:>12.0f}")
        print("(peak RSS: ru_maxrss of the reading process, interpreter, numpy and both "
              "readers' modules included)")
        ours, theirs = bf16_check(tmp)
        print(f"\nbfloat16 without torch:\n  lockstep: {ours}\n  library:  {theirs}")
        print("\ncorrupt and hostile files (the message each gives):")
        for name, p in corrupt_files(tmp).items():
            print(f"- {name}\n    lockstep: {lockstep_message(p)}\n"
                  f"    library:  {library_message(p)}")


if __name__ == "__main__":
    main()
