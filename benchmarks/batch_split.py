#!/usr/bin/env python
"""How long lockstep takes to find whose token is whose in a large packed batch and to split
it into one dump per sequence.

A packed batch written the way vLLM runs one (docs/batching.md, "Engines that pack"): S
sequences whose P-token prompts share their first half (a system prompt), each fed in
chunks of C tokens, then D decode steps, all in one flat batch per step, recorded as
``input_ids``, ``positions`` and one (tokens, 8) float32 tensor per step, with the
``batch_request`` lockstep writes. Prints the time to find the layout (``layout_of``) and to
split the dump (``split_batch``), and checks that every sequence's segments, in order, hold
exactly the tokens it was fed.

    .venv/bin/python benchmarks/batch_split.py                      # 8, 64 and 256 sequences
    .venv/bin/python benchmarks/batch_split.py --sequences 64 --prompt 256 --chunk 64 --decode 32
"""

from __future__ import annotations

import argparse
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

import lockstep
from lockstep.batching.infer import REQUEST_KEY
from lockstep.batching.split import layout_of, split_batch

SHAPES = ((8, 64, 16, 16), (64, 256, 64, 32), (256, 512, 128, 64))


def write_batch(path: Path, count: int, prompt: int, chunk: int, decode: int) -> int:
    """The packed batch, recorded; returns its steps."""
    rng = random.Random(0)
    system = [rng.randrange(1000) for _ in range(prompt // 2)]
    prompts = [system + [rng.randrange(1000) for _ in range(prompt - len(system))]
               for _ in range(count)]
    chosen = [[rng.randrange(1000) for _ in range(decode + 1)] for _ in range(count)]
    fed = [0] * count
    meta = {REQUEST_KEY: {"prompts": prompts, "join_at": [0] * count,
                          "generated_token_ids": chosen}}
    steps = 0
    with lockstep.record(path, meta=meta, overwrite=True) as rec:
        while any(f < prompt + decode for f in fed):
            ids: list[int] = []
            pos: list[int] = []
            for i in range(count):
                if fed[i] < prompt:  # a chunk of its prompt
                    end = min(prompt, fed[i] + chunk)
                    ids += prompts[i][fed[i]:end]
                    pos += range(fed[i], end)
                    fed[i] = end
                elif fed[i] < prompt + decode:  # its next decode token
                    ids.append(chosen[i][fed[i] - prompt])
                    pos.append(fed[i])
                    fed[i] += 1
            with rec.step():
                rec.capture("input_ids", np.array(ids, dtype=np.int64))
                rec.capture("positions", np.array(pos, dtype=np.int64))
                rec.capture("layers.0.out", np.zeros((len(ids), 8), dtype=np.float32))
            steps += 1
    return steps


def measure(root: Path, count: int, prompt: int, chunk: int, decode: int) -> None:
    path = root / f"batch-{count}.lsd"
    steps = write_batch(path, count, prompt, chunk, decode)
    t0 = time.perf_counter()
    with lockstep.open_dump(path) as dump:
        layout = layout_of(dump)
        fed = {t: np.asarray(dump.read(dump.get(t, "input_ids"))) for t in dump.steps}
    t1 = time.perf_counter()
    split_batch(path, root / f"split-{count}")
    t2 = time.perf_counter()
    req = layout.prompts
    wrong = 0
    for i in range(count):  # its segments, in order, hold the tokens it was fed
        got = [int(x) for st, seg in layout.of(i)
               for x in fed[st.step][seg.start:seg.start + seg.length]]
        wrong += got[:prompt] != list(req[i]) or len(got) != prompt + decode
    tokens = sum(st.width for st in layout.steps)
    print(f"{count:4d} sequences x ({prompt} prompt tokens in chunks of {chunk} + {decode} "
          f"decode): {steps} steps, {tokens} tokens; layout {t1 - t0:.2f} s, split "
          f"{t2 - t1:.2f} s; sequences whose segments are not their tokens: {wrong}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sequences", type=int)
    ap.add_argument("--prompt", type=int, default=256)
    ap.add_argument("--chunk", type=int, default=64)
    ap.add_argument("--decode", type=int, default=32)
    args = ap.parse_args()
    shapes = SHAPES if args.sequences is None else \
        ((args.sequences, args.prompt, args.chunk, args.decode),)
    root = Path(tempfile.mkdtemp(prefix="lockstep-batch-split-"))
    try:
        for shape in shapes:
            measure(root, *shape)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
