#!/usr/bin/env python
"""Ways of getting every module output of a forward into the page cache, measured against a
plain forward in the same rounds. The recorder is left out: each way is a bare forward hook,
so only the write path differs.

* direct:  one ``writev`` per tensor from its own memory, on the engine's thread;
* staged:  tensors under 64 KiB copied into a 1 MiB buffer written in one ``writev`` when it
           fills or before a larger tensor (which goes out alone), the rest at the end;
* thread:  every tensor copied (``memmove``) into a preallocated 64 MiB ring on the engine's
           thread, and a writer thread draining a queue of ring slices with ``writev`` while
           the forward runs (only the system calls leave the GIL); joined at the end.

The SmolLM2-135M-shaped Llama of capture_overhead.py, 32-token prefill, float32. Each way
writes a new file under a temporary folder (removed). Printed: the median of each round's
own time/plain ratio, and the range.

    python benchmarks/capture_write_paths.py --repeats 11
"""

from __future__ import annotations

import argparse
import ctypes
import os
import queue
import shutil
import statistics
import sys
import tempfile
import threading
import time
from typing import Any

import torch

from capture_overhead import build_model, cpu_model

STAGE_LIMIT, STAGE, RING = 64 << 10, 1 << 20, 64 << 20


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeats", type=int, default=11)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--layers", type=int, default=30)
    ap.add_argument("--tokens", type=int, default=32)
    args = ap.parse_args(argv)
    model = build_model(args.layers)
    ids = torch.randint(0, model.config.vocab_size, (1, args.tokens),
                        generator=torch.Generator().manual_seed(1))
    print(f"machine: {cpu_model()}, {os.cpu_count()} cores; torch {torch.get_num_threads()} "
          f"threads; load average {os.getloadavg()[0]:.1f}")
    tmp = tempfile.mkdtemp(prefix="lockstep-paths-")
    ring = torch.empty(RING, dtype=torch.uint8)
    stage = torch.empty(STAGE, dtype=torch.uint8)
    count = [0]

    def run(way: str) -> float:
        count[0] += 1
        path = os.path.join(tmp, f"{way}{count[0]}")
        fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o644)
        jobs: queue.SimpleQueue[Any] = queue.SimpleQueue()
        at = [0, 0]  # ring position, staged bytes

        def drain() -> None:
            while (item := jobs.get()) is not None:
                os.writev(fd, [item])

        def view(ptr: int, n: int) -> memoryview:
            return memoryview((ctypes.c_char * n).from_address(ptr))

        def hook(module: Any, args_: Any, out: Any) -> None:
            if type(out) is not torch.Tensor:
                return
            n = out.numel() * out.element_size()
            if way == "direct":
                os.writev(fd, [view(out.data_ptr(), n)])
            elif way == "staged":
                if n < STAGE_LIMIT:
                    if at[1] + n > STAGE:
                        os.writev(fd, [view(stage.data_ptr(), at[1])])
                        at[1] = 0
                    ctypes.memmove(stage.data_ptr() + at[1], out.data_ptr(), n)
                    at[1] += n
                else:
                    os.writev(fd, [view(stage.data_ptr(), at[1]), view(out.data_ptr(), n)])
                    at[1] = 0
            else:  # thread (the ring is larger than one forward's outputs here)
                if at[0] + n > RING:
                    at[0] = 0
                ctypes.memmove(ring.data_ptr() + at[0], out.data_ptr(), n)
                jobs.put(view(ring.data_ptr() + at[0], n))
                at[0] += n

        handles = [m.register_forward_hook(hook) for m in model.modules()] \
            if way != "plain" else []
        writer = threading.Thread(target=drain) if way == "thread" else None
        t = time.perf_counter()
        if writer is not None:
            writer.start()
        model(ids)
        if writer is not None:
            jobs.put(None)
            writer.join()
        if way == "staged" and at[1]:
            os.writev(fd, [view(stage.data_ptr(), at[1])])
        dt = time.perf_counter() - t
        for h in handles:
            h.remove()
        os.close(fd)
        os.unlink(path)
        return dt

    ways = ["plain", "direct", "staged", "thread"]
    times: dict[str, list[float]] = {w: [] for w in ways}
    try:
        with torch.no_grad():
            for i in range(args.warmup + args.repeats):
                for way in ways:
                    dt = run(way)
                    if i >= args.warmup:
                        times[way].append(dt)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"plain forward: median {statistics.median(times['plain']) * 1e3:.1f} ms "
          f"(min {min(times['plain']) * 1e3:.1f})")
    for way in ways[1:]:
        ratios = sorted(a / b for a, b in zip(times[way], times["plain"]))
        print(f"{way:7s} median of {len(ratios)} rounds' ratio {statistics.median(ratios):.3f} "
              f"(range {ratios[0]:.3f}-{ratios[-1]:.3f}); median "
              f"{statistics.median(times[way]) * 1e3:.1f} ms")
    return 0


if __name__ == "__main__":
    sys.exit(main())
