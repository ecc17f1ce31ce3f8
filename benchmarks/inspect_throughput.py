"""Throughput and peak memory of `lockstep inspect` on a ~1 GB safetensors file.

Writes the file (half bf16, half f32 tensors, streamed to disk a piece at a time) into a
temporary directory, then inspects it in a fresh child process so that the peak RSS
(``ru_maxrss`` of the child) is the inspection's alone. The file is in the page cache after
being written: this measures the reader and the statistics, not the disk.

    python benchmarks/inspect_throughput.py [--gb 1.0] [--keep DIR]

Targets: >= 500 MB/s, < 300 MB peak RSS.
"""

from __future__ import annotations

import argparse
import json
import resource
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

PIECE = 1 << 22  # elements generated and written at a time
TENSOR_BYTES = 64 << 20

CHILD = r"""
import json, resource, sys, time
from lockstep.checkpoint import inspect_checkpoint
t0 = time.perf_counter()
report = inspect_checkpoint(sys.argv[1])
dt = time.perf_counter() - t0
print(json.dumps({"seconds": dt, "bytes": report.bytes_read, "tensors": len(report.tensors),
                  "bad": len(report.bad),
                  "maxrss_kb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss}))
"""


def write_file(path: Path, total_bytes: int) -> int:
    """A safetensors file of alternating bf16 and f32 tensors; returns its data size."""
    n = max(2, -(-total_bytes // TENSOR_BYTES))
    header, specs, offset = {}, [], 0
    for i in range(n):
        dtype, item = ("BF16", 2) if i % 2 == 0 else ("F32", 4)
        elems = TENSOR_BYTES // item
        name = f"model.layers.{i // 2}.mlp.{'up' if i % 2 else 'gate'}_proj.weight"
        header[name] = {"dtype": dtype, "shape": [elems // 4096, 4096],
                        "data_offsets": [offset, offset + elems * item]}
        specs.append((dtype, elems))
        offset += elems * item
    header["__metadata__"] = {"format": "pt"}
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    rng = np.random.default_rng(0)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw)
        for dtype, elems in specs:
            for lo in range(0, elems, PIECE):
                piece = rng.standard_normal(min(PIECE, elems - lo), dtype=np.float32) * 0.02
                if dtype == "BF16":
                    piece = (piece.view(np.uint32) >> 16).astype(np.uint16)
                f.write(piece.tobytes())
    return offset


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--gb", type=float, default=1.0, help="file size in GB (default 1)")
    ap.add_argument("--keep", help="write the file here and keep it")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(args.keep or tmp) / "bench.safetensors"
        path.parent.mkdir(parents=True, exist_ok=True)
        t0 = time.perf_counter()
        size = write_file(path, int(args.gb * 1e9))
        print(f"wrote {path} ({size / 1e6:.0f} MB of data) in {time.perf_counter() - t0:.1f} s")
        res = json.loads(subprocess.run([sys.executable, "-c", CHILD, str(path)], check=True,
                                        capture_output=True, text=True).stdout)
    mbps = res["bytes"] / 1e6 / res["seconds"]
    peak = res["maxrss_kb"] / 1024
    print(f"inspected {res['tensors']} tensors, {res['bytes'] / 1e6:.0f} MB in "
          f"{res['seconds']:.2f} s: {mbps:.0f} MB/s (target >= 500)")
    print(f"peak RSS {peak:.0f} MB (target < 300)  [ru_maxrss of the inspecting process, "
          f"interpreter and numpy included]")
    ru = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(f"(writer process peak RSS {ru / 1024:.0f} MB)")


if __name__ == "__main__":
    main()
