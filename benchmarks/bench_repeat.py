#!/usr/bin/env python
"""Do two runs of ``lockstep bench`` agree? Reads the two runs' ``--json`` files and, for
every figure and side, says whether each run's median falls within the other run's 95%
interval, and whether either run flagged the figure (``noisy``: CV over 10%, or ``drifted``:
its second half 5% off its first).

A figure apart in the two runs and flagged in neither is what the report should never let
through: a confident figure that a rerun contradicts. The script prints the count of those
last, and exits 1 if there is any.

    lockstep bench REF CAND --prompt "..." --json a.json
    lockstep bench REF CAND --prompt "..." --json b.json
    python benchmarks/bench_repeat.py a.json b.json
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from lockstep.bench.stats import DRIFT, NOISY_CV


def _flag(side: dict[str, Any]) -> str:
    """What the report flagged in a side's figure (the thresholds of lockstep.bench.stats)."""
    flags = []
    if side.get("cv", 0) > NOISY_CV:
        flags.append(f"cv {side['cv']:.2f}")
    if abs(side.get("drift", 0)) > DRIFT:
        flags.append(f"drift {side['drift']:+.0%}")
    return ", ".join(flags)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("first")
    ap.add_argument("second")
    args = ap.parse_args(argv)
    runs = []
    for path in (args.first, args.second):
        try:
            with open(path, encoding="utf-8") as f:
                runs.append({fig["name"]: fig for fig in json.load(f)["figures"]})
        except (OSError, ValueError, KeyError, TypeError) as exc:
            print(f"bench_repeat: cannot read {path}: {exc}", file=sys.stderr)
            return 2
    within = apart_flagged = apart_unflagged = 0
    for name in runs[0]:
        if name not in runs[1]:
            continue
        for side in ("reference", "candidate"):
            a, b = runs[0][name][side], runs[1][name][side]
            ok = a["ci"][0] <= b["median"] <= a["ci"][1] and b["ci"][0] <= a["median"] <= b["ci"][1]
            flags = "; ".join(f"run {i + 1}: {f}" for i, f in enumerate((_flag(a), _flag(b)))
                              if f)
            if ok:
                within += 1
                verdict = "within each other's intervals"
            elif flags:
                apart_flagged += 1
                verdict = "APART, flagged"
            else:
                apart_unflagged += 1
                verdict = "APART, NOT FLAGGED"
            print(f"{name:32} {side:9}  {a['median']:9.4g} ({a['ci'][0]:.4g}-{a['ci'][1]:.4g})"
                  f"  {b['median']:9.4g} ({b['ci'][0]:.4g}-{b['ci'][1]:.4g})  {verdict}"
                  + (f" [{flags}]" if flags else ""))
    total = within + apart_flagged + apart_unflagged
    print(f"\n{within} of {total} medians within each other's intervals; {apart_flagged} apart "
          f"and flagged noisy or drifted in a run; {apart_unflagged} apart and flagged in "
          "neither run")
    return 1 if apart_unflagged else 0


if __name__ == "__main__":
    sys.exit(main())
