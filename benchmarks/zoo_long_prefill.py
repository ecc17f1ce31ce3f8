"""One long prefill of the long boundary model (context 33024), one engine per process.

    python benchmarks/zoo_long_prefill.py [hf|zoo] [--tokens 32769] [--model DIR]

Prints the prefill's seconds and the process's peak RSS. The zoo's attention takes a long
prefill's query rows a block at a time (``attention.SCORE_ELEMENTS``); without that, one
(heads, 32769, 32769) float32 score matrix is 17 GB. Run one engine at a time: two 33k-token
prefills side by side share the CPU and each other's memory.
"""

from __future__ import annotations

import argparse
import resource
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("engine", choices=("hf", "zoo"))
    parser.add_argument("--tokens", type=int, default=32769)
    parser.add_argument("--model", type=Path, default=Path(tempfile.gettempdir()) / "lockstep-long")
    args = parser.parse_args()
    sys.path.insert(0, str(ROOT / "src"))
    import numpy as np

    from lockstep.engines import open_engine
    from lockstep.zoo.boundary_bugs import LONG_CONTEXT, boundary_model

    model = boundary_model(args.model, LONG_CONTEXT)
    ids = [int(t) for t in np.random.default_rng(0).integers(0, 320, args.tokens)]
    engine = open_engine(f"{args.engine}:{model}")
    engine.load()
    start = time.perf_counter()
    engine.decode_logits(ids, 1)
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"{args.engine}: a {args.tokens}-token prefill in {seconds:.1f} s, peak RSS "
          f"{peak:.0f} MB")


if __name__ == "__main__":
    main()
