#!/usr/bin/env python
"""Do two runs of ``lockstep bench`` agree? Reads the two runs' ``--json`` files and, for
every figure and side, says whether each run's median falls within the other run's 95%
interval, and whether either run flagged the figure (``noisy``: CV over 10%, ``drifted``:
its second half 5% off its first, or its forks' medians more than 10% apart).

A figure apart in the two runs and flagged in neither is what the report should never let
through: a confident figure that a rerun contradicts. The script prints the count of those
last, and exits 1 if there is any.

"Within each other's intervals" is a strict test: even with exact 95% intervals from two runs
of one unchanging machine, a median falls outside the other run's interval about 16% of the
time (the difference of two medians has sqrt(2) times one median's spread; 1.96/sqrt(2) is
1.39 standard errors), so a few of 16 figures fail it by chance alone. A figure whose two
intervals do not even overlap is apart beyond that (about 0.6% by chance): the script counts
those too, and its exit code is about them.

    lockstep bench REF CAND --prompt "..." --json a.json
    lockstep bench REF CAND --prompt "..." --json b.json
    python benchmarks/bench_repeat.py a.json b.json
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from lockstep.bench.stats import DRIFT, FORKS_APART, NOISY_CV, fork_spread


def _flag(side: dict[str, Any]) -> str:
    """What the report flagged in a side's figure (the thresholds of lockstep.bench.stats)."""
    flags = []
    if side.get("cv", 0) > NOISY_CV:
        flags.append(f"cv {side['cv']:.2f}")
    if abs(side.get("drift", 0)) > DRIFT:
        flags.append(f"drift {side['drift']:+.0%}")
    spread = fork_spread(side.get("fork_medians", []))
    if spread > FORKS_APART:
        flags.append(f"forks {spread:.0%} apart")
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
    within = overlap = apart_flagged = apart_unflagged = 0
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
            elif a["ci"][0] <= b["ci"][1] and b["ci"][0] <= a["ci"][1]:
                overlap += 1
                verdict = "intervals overlap" + (", flagged" if flags else "")
            elif flags:
                apart_flagged += 1
                verdict = "APART, flagged"
            else:
                apart_unflagged += 1
                verdict = "APART, NOT FLAGGED"
            print(f"{name:32} {side:9}  {a['median']:9.4g} ({a['ci'][0]:.4g}-{a['ci'][1]:.4g})"
                  f"  {b['median']:9.4g} ({b['ci'][0]:.4g}-{b['ci'][1]:.4g})  {verdict}"
                  + (f" [{flags}]" if flags else ""))
    total = within + overlap + apart_flagged + apart_unflagged
    print(f"\n{within} of {total} medians within each other's intervals; {overlap} more whose "
          f"intervals overlap; {apart_flagged} apart and flagged (noisy, drifted or forks "
          f"apart) in a run; {apart_unflagged} apart and flagged in neither run")
    return 1 if apart_unflagged else 0


if __name__ == "__main__":
    sys.exit(main())
