#!/usr/bin/env python
"""What replay (the dual test) adds to ``lockstep diff``: SmolLM2-135M through transformers
(reference) against llama.cpp (candidate), prefill plus 4 decode steps, with and without
replay, interleaved, ``--repeats`` times after one warm-up each; medians and their ratio.

    .venv/bin/python benchmarks/replay_overhead.py
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
import time
from pathlib import Path

from lockstep.demo import DECODE, PROMPT, find_smollm2
from lockstep.workflows.diff import diff


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args(argv)
    gguf = find_smollm2()
    tmp = Path(tempfile.mkdtemp(prefix="lockstep-replay-bench-"))
    times: dict[bool, list[float]] = {False: [], True: []}
    ops = 0
    try:
        for round_ in range(args.repeats + 1):
            for replay in (False, True):
                out = tmp / f"r{int(replay)}"
                shutil.rmtree(out, ignore_errors=True)
                t0 = time.perf_counter()
                result = diff(f"hf:{gguf}", f"llamacpp:{gguf}", out, prompt=PROMPT,
                              decode=DECODE, replay=replay)
                if round_:
                    times[replay].append(time.perf_counter() - t0)
                if replay and result.replay is not None:
                    ops = len(result.replay.ops)
                    verdict, seconds = result.verdict, result.replay.seconds
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    plain, replayed = statistics.median(times[False]), statistics.median(times[True])
    print(f"lockstep diff hf: vs llamacpp: on {gguf.name}, {DECODE} decode steps, medians of "
          f"{args.repeats}")
    print(f"  without replay  {plain:7.2f} s")
    print(f"  with replay     {replayed:7.2f} s   ({ops} ops replayed, {seconds:.2f} s inside "
          f"the replay itself; verdict {verdict})")
    print(f"  ratio {replayed / plain:.2f} (target <= 1.5)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
