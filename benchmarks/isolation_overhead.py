#!/usr/bin/env python
"""What running llama.cpp in its own process costs a whole capture.

``lockstep capture llamacpp:...`` runs llama.cpp in a worker process (so a crash in it is one
line and exit 2, not a lost run); the worker writes the dump itself, so no tensor crosses a
pipe. This times one whole capture (load the GGUF, prefill, ``--decode`` greedy steps, every
graph node recorded, dump closed) both ways, interleaved, ``--repeats`` times after one
warm-up each, and prints the medians and their ratio:

* in process: ``capture(spec, out, ..., isolate=False)``;
* isolated:   ``capture(spec, out, ...)`` (the default: a worker started, the model loaded in
              it, the dump written by it, the worker closed).

    .venv/bin/python benchmarks/isolation_overhead.py
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
import time
from pathlib import Path

from lockstep.demo import PROMPT, find_smollm2
from lockstep.store import open_dump
from lockstep.workflows.capture import capture


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", help="a GGUF file (default: the SmolLM2 demo model)")
    ap.add_argument("--decode", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args(argv)

    gguf = Path(args.model) if args.model else find_smollm2()
    spec = f"llamacpp:{gguf}"
    tmp = Path(tempfile.mkdtemp(prefix="lockstep-isolation-bench-"))
    variants = {"in process": {"isolate": False}, "isolated": {}}
    times: dict[str, list[float]] = {name: [] for name in variants}
    records: dict[str, int] = {}
    try:
        for round_ in range(args.repeats + 1):
            for name, options in variants.items():
                out = tmp / name.replace(" ", "_")
                shutil.rmtree(out, ignore_errors=True)
                t0 = time.perf_counter()
                capture(spec, str(out), prompt=PROMPT, decode=args.decode, **options)
                dt = time.perf_counter() - t0
                if round_:  # the first round warms the page cache and the imports
                    times[name].append(dt)
                with open_dump(out) as dump:
                    records[name] = len(dump.records)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"lockstep capture {gguf.name}, prompt {PROMPT!r}, {args.decode} decode steps, "
          f"medians of {args.repeats} (model load included)")
    for name in variants:
        print(f"  {name:10}  {med[name] * 1e3:8.1f} ms   ({records[name]} records)")
    print(f"  isolated / in process: {med['isolated'] / med['in process']:.2f}  "
          f"(+{(med['isolated'] - med['in process']) * 1e3:.0f} ms a capture)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
