#!/usr/bin/env python
"""What recording costs a CUDA forward, and whether the side-stream copies write the same bytes.

A randomly initialised Llama with SmolLM2-135M's shape (benchmarks/capture_overhead.py's
``smollm2_135m_config``; ``--layers``, ``--dtype``) runs on the GPU: a prefill of ``--tokens``
tokens and ``--decode`` greedy decode steps with a KV cache, under ``torch.no_grad``, three
ways, interleaved over ``--repeats`` rounds after ``--warmup`` rounds:

* plain:   the forwards alone;
* auto:    ``lockstep.record(dir)`` with every module watched: each output copied on a side
           stream into pooled pinned host buffers, written by the writer thread (docs/gpu.md);
* sync:    ``lockstep.record(dir, copies="sync")``: each output copied with a blocking copy,
           the engine's thread waiting for every tensor.

Each run is timed from its start to ``torch.cuda.synchronize()`` after its last forward and,
for the recordings, after the close (the dump complete on disk). Printed: medians, the ratios
auto/plain and sync/plain, and the round-by-round ratio. Then one auto and one sync dump of
the same forwards are compared byte for byte (``index.jsonl`` and ``data.bin``), and each
kind of run is repeated once under ``torch.cuda.set_sync_debug_mode("warn")`` to count the
synchronising CUDA calls torch reports (recording "auto" should add none to plain's).

On a machine without CUDA it says so and exits 0: nothing is measured. ``--device cpu`` runs
the same code on the CPU, as a check of the script itself (those are not GPU figures).

    .venv/bin/python benchmarks/gpu_capture.py                     # SmolLM2-135M shape, bf16
    .venv/bin/python benchmarks/gpu_capture.py --layers 2 --repeats 3 --device cpu  # smoke
"""

from __future__ import annotations

import argparse
import filecmp
import os
import shutil
import statistics
import sys
import tempfile
import time
import warnings
from typing import Any, Callable

import torch

import lockstep
from capture_overhead import smollm2_135m_config
from lockstep.engines.hf import forward_step


def build(layers: int, dtype: torch.dtype, device: str) -> Any:
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(smollm2_135m_config(layers)).to(device=device, dtype=dtype).eval()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda", help="cuda (default), or cpu to check the "
                    "script itself")
    ap.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16", "float32"))
    ap.add_argument("--layers", type=int, default=30, help="decoder layers (default 30)")
    ap.add_argument("--tokens", type=int, default=512, help="prefill length (default 512)")
    ap.add_argument("--decode", type=int, default=8, help="decode steps (default 8)")
    ap.add_argument("--repeats", type=int, default=10, help="timed rounds (default 10)")
    ap.add_argument("--warmup", type=int, default=2, help="untimed rounds first (default 2)")
    ap.add_argument("--tmp", default=None, help="folder for the temporary dumps")
    args = ap.parse_args(argv)
    cuda = args.device.startswith("cuda")
    if cuda and not torch.cuda.is_available():
        print(f"gpu_capture: no CUDA device here (torch {torch.__version__}, "
              f"torch.version.cuda={torch.version.cuda}); cannot run: nothing measured")
        return 0
    if args.repeats < 1:
        ap.error("--repeats must be at least 1")

    model = build(args.layers, getattr(torch, args.dtype), args.device)
    n_params = sum(p.numel() for p in model.parameters())
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(0, model.config.vocab_size, (1, args.tokens), generator=gen)
    ids = ids.to(args.device)
    where = torch.cuda.get_device_name(args.device) if cuda else "CPU (a check of the script: " \
        "not a GPU figure)"
    print(f"device: {where}; torch {torch.__version__}; lockstep {lockstep.__version__}")
    print(f"model: Llama, SmolLM2-135M shape, {args.layers} layers, {n_params / 1e6:.1f}M "
          f"params, {args.dtype}; prefill {args.tokens} tokens + {args.decode} decode steps")

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize()

    def forwards() -> None:
        out, cache = forward_step(model, ids, None)
        for _ in range(args.decode):
            out, cache = forward_step(model, out.logits[:, -1:].argmax(-1), cache)

    tmp = tempfile.mkdtemp(prefix="lockstep-gpu-", dir=args.tmp)
    counter = [0]

    def recording(copies: str, path: str | None = None) -> Callable[[], float]:
        def run() -> float:
            counter[0] += 1
            out = path or os.path.join(tmp, f"{copies}-{counter[0]}")
            sync()
            t = time.perf_counter()
            with lockstep.record(out, copies=copies, meta={"created": 0}) as rec:
                rec.watch(model)
                forwards()
                sync()
            dt = time.perf_counter() - t
            if path is None:
                shutil.rmtree(out, ignore_errors=True)
            return dt
        return run

    def plain() -> float:
        sync()
        t = time.perf_counter()
        forwards()
        sync()
        return time.perf_counter() - t

    runs = {"plain": plain, "auto": recording("auto"), "sync": recording("sync")}
    times: dict[str, list[float]] = {k: [] for k in runs}
    try:
        with torch.no_grad():
            for i in range(args.warmup + args.repeats):
                for kind, fn in runs.items():
                    dt = fn()
                    if i >= args.warmup:
                        times[kind].append(dt)
            a, b = os.path.join(tmp, "same-auto"), os.path.join(tmp, "same-sync")
            recording("auto", a)()
            recording("sync", b)()
            same = {name: filecmp.cmp(os.path.join(a, name), os.path.join(b, name),
                                      shallow=False) for name in ("index.jsonl", "data.bin")}
            with lockstep.open_dump(a) as dump:
                n_records, n_bytes = len(dump), sum(r.nbytes or 0 for r in dump)
                steps, complete = len(dump.steps), dump.complete
            syncs = {kind: count_syncs(fn) for kind, fn in runs.items()} if cuda else {}
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"\nwall time to the last synchronize (recordings: to the dump complete), median of "
          f"{args.repeats} after {args.warmup} warmup, min in brackets:")
    for kind in runs:
        print(f"  {kind:6} {med[kind] * 1e3:9.1f} ms   [{min(times[kind]) * 1e3:.1f}]")
    for kind in ("auto", "sync"):
        rounds = sorted(r / p for r, p in zip(times[kind], times["plain"]))
        print(f"  ratio {kind}/plain {med[kind] / med['plain']:6.3f}   (median of rounds' own "
              f"{statistics.median(rounds):.3f}, range {rounds[0]:.3f}-{rounds[-1]:.3f})")
    print(f"\ndump: {n_records} records, {n_bytes / (1 << 20):.1f} MiB of tensor data, "
          f"{steps} steps, complete={complete}")
    print(f"auto and sync dumps byte-identical: index.jsonl {same['index.jsonl']}, "
          f"data.bin {same['data.bin']}")
    if syncs:
        print("synchronising CUDA calls torch reported in one run (set_sync_debug_mode warn): "
              + ", ".join(f"{k} {v}" for k, v in syncs.items()))
    return 0 if all(same.values()) else 1


def count_syncs(run: Callable[[], float]) -> int:
    """How many synchronising CUDA calls torch warns of while ``run`` runs once."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            run()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return sum(1 for w in caught if "synchroniz" in str(w.message).lower())


if __name__ == "__main__":
    sys.exit(main())
