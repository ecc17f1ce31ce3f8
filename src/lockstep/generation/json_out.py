"""The generation check's JSON report (schema in docs/report.md, "lockstep generate").

Plain dicts of JSON types; non-finite numbers are written as the strings "inf", "-inf" and
"nan", as in the comparison report.
"""

from __future__ import annotations

import os
from typing import Any

from .._version import __version__
from ..atomic import write_json_file
from ..jsontext import json_number
from ..report.json_report import pair_dict, report_dict
from .garbage import GarbageFlag
from .metrics import KLStats, StepCompare, StepSummary
from .result import FreeRun, GenerationResult, Localization, PromptResult

__all__ = ["GENERATE_SCHEMA_VERSION", "generation_dict", "write_generation_json"]

GENERATE_SCHEMA_VERSION = 1


def _kl(k: KLStats) -> dict[str, Any]:
    return {"count": k.count, "nonfinite": k.nonfinite, "mean": json_number(k.mean),
            "median": json_number(k.median), "p99": json_number(k.p99), "max": json_number(k.max)}


def _summary(s: StepSummary) -> dict[str, Any]:
    return {"steps": s.steps, "same_top": s.same_top, "same_top_rate": s.same_top_rate,
            "near_ties": s.near_ties, "splits": s.splits, "first_split": s.first_split,
            "not_close": s.not_close, "off_argmax": s.off_argmax, "same_argmax": s.same_argmax,
            "top_k_overlap": json_number(s.overlap), "kl": _kl(s.kl),
            "dp_mean": json_number(s.dp_mean), "dp_rms": json_number(s.dp_rms)}


def _step(s: StepCompare) -> dict[str, Any]:
    return {"step": s.step, "reference_token": s.ref_token, "candidate_token": s.cand_token,
            "kind": s.kind, "reference_margin": json_number(s.ref_margin),
            "candidate_margin": json_number(s.cand_margin), "reference_gap": json_number(s.ref_gap),
            "candidate_gap": json_number(s.cand_gap), "kl": json_number(s.kl),
            "top_k_overlap": s.overlap,
            "reference_in_candidate_top_k": s.ref_in_cand_top_k,
            "candidate_in_reference_top_k": s.cand_in_ref_top_k,
            "reference_prob": json_number(s.ref_prob), "candidate_prob": json_number(s.cand_prob),
            "reference_top_k": [[t, json_number(p)] for t, p in s.ref_top],
            "candidate_top_k": [[t, json_number(p)] for t, p in s.cand_top]}


def _free(f: FreeRun) -> dict[str, Any]:
    return {"reference_tokens": list(f.ref_tokens), "candidate_tokens": list(f.cand_tokens),
            "reference_text": f.ref_text, "candidate_text": f.cand_text,
            "shared": f.shared, "split_step": f.split_step,
            "split": _step(f.split) if f.split is not None else None}


def _flag(f: GarbageFlag) -> dict[str, Any]:
    return {"kind": f.kind, "step": f.step, "detail": f.detail}


def _localization(loc: Localization | None, whole: bool = False) -> dict[str, Any] | None:
    if loc is None:
        return None
    c = loc.comparison
    if c is None:
        return {"step": loc.step, "out": loc.out, "error": loc.error, "verdict": None,
                "first_divergence": None, "summary": None}
    full = report_dict(c)
    return {"step": loc.step, "out": loc.out, "error": None, "verdict": c.verdict,
            "first_divergence": pair_dict(c.first_divergence) if c.first_divergence else None,
            "summary": full["summary"], "reference_dump": full["reference_dump"]["path"],
            "candidate_dump": full["candidate_dump"]["path"],
            **({"report": full} if whole else {})}


def _prompt(p: PromptResult, whole: bool = False) -> dict[str, Any]:
    return {"index": p.index, **p.prompt.as_dict(), "prompt_token_ids": list(p.prompt_ids),
            "ok": p.ok, "split_step": p.split_step, "kl_step": p.kl_step,
            "diverged_step": p.diverged_step, "free_running": _free(p.free),
            "teacher_forced": {**_summary(p.summary), "steps_detail": [_step(s) for s in p.steps]},
            "garbage": [_flag(f) for f in p.garbage],
            "candidate_flags": [_flag(f) for f in p.candidate_flags],
            "reference_flags": [_flag(f) for f in p.reference_flags],
            "localization": _localization(p.localization, whole),
            "pieces": {str(t): text for t, text in sorted(p.pieces.items())},
            "decode_check": None if p.decode_check is None else {
                "kl": p.decode_check.kl, "limit": p.decode_check.limit,
                "prefill_kl": p.decode_check.prefill_kl, "broken": p.decode_check.broken}}


def generation_dict(result: GenerationResult, *, whole: bool = False) -> dict[str, Any]:
    """The whole check as the documented JSON object; ``whole``: each localization also
    carries its comparison's full report (``report``: the ``report_dict``), as the HTML
    report draws it."""
    t = result.timing
    cfg = result.settings
    return {
        "schema": GENERATE_SCHEMA_VERSION,
        "kind": "generate",
        "lockstep_version": __version__,
        "ok": bool(result),
        "reference": {"spec": result.reference.spec, "meta": dict(result.reference.meta)},
        "candidate": {"spec": result.candidate.spec, "meta": dict(result.candidate.meta)},
        "settings": {"max_new_tokens": cfg.max_new_tokens, "top_k": cfg.top_k,
                     "near_tie": cfg.near_tie, "max_kl": cfg.max_kl},
        "summary": {**_summary(result.summary),
                    "prompts": len(result.prompts),
                    "prompts_split": sum(p.split_step is not None for p in result.prompts),
                    "prompts_over_kl": sum(p.kl_step is not None for p in result.prompts),
                    "prompts_garbage": sum(bool(p.garbage) for p in result.prompts)},
        "timing": {"load_s": t.load_s, "reference_s": t.reference_s,
                   "candidate_s": t.candidate_s, "engine_s": t.engine_s,
                   "localize_s": t.localize_s,
                   "total_s": t.total_s, "overhead_s": t.overhead_s},
        "prompts": [_prompt(p, whole) for p in result.prompts],
    }


def write_generation_json(result: GenerationResult, path: str | os.PathLike[str]) -> None:
    """Write the report, atomically."""
    write_json_file(generation_dict(result), path)
