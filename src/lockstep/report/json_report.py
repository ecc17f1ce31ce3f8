"""The JSON report (schema in docs/report.md). Plain dicts of JSON types; no NaN or Infinity
(JSON has neither): non-finite numbers are written as the strings "inf", "-inf", "nan"."""

from __future__ import annotations

import math
import os
from typing import Any

from .._version import __version__
from ..atomic import write_json_file
from ..compare.comparison import Comparison, DumpSummary
from ..compare.metrics import TensorMetrics
from ..compare.pair_result import PairResult
from ..compare.statistics import CAN_SHOW, CANNOT_SHOW
from ..jsontext import json_number, json_safe
from ..store.reader import Record
from .pair_status import status

__all__ = ["SCHEMA_VERSION", "report_dict", "statistics_sentence", "write_json",
           "write_report"]

SCHEMA_VERSION = 1


def _metrics(m: TensorMetrics | None) -> dict[str, Any] | None:
    if m is None:
        return None
    out: dict[str, Any] = {
        "max_abs": json_number(m.max_abs), "mean_abs": json_number(m.mean_abs),
        "rel_l2": json_number(m.rel_l2), "cosine": json_number(m.cosine), "ref_nan": m.ref_nan,
        "ref_inf": m.ref_inf,
        "cand_nan": m.cand_nan, "cand_inf": m.cand_inf, "worst_index": list(m.worst_index),
        "worst_ref": json_number(m.worst_ref), "worst_cand": json_number(m.worst_cand),
        "mismatched": m.mismatched, "numel": m.numel,
    }
    if m.topk is not None:
        out["top1"] = {"rows": m.topk.rows, "agree": m.topk.agree,
                       "near_ties": m.topk.near_ties,
                       "first_disagreement": m.topk.first_disagreement}
    return out


def pair_dict(p: PairResult) -> dict[str, Any]:
    """One pair as the report writes it."""
    return {
        "step": p.step, "reference": p.ref_name, "candidate": p.cand_name, "call": p.call,
        "paired_by": p.how, "canonical": p.canonical, "transform": p.transform,
        "reference_shape": list(p.ref_shape),
        "candidate_shape": list(p.cand_shape), "reference_dtype": p.ref_dtype,
        "candidate_dtype": p.cand_dtype, "error": json_number(p.error), "tolerance": p.tol,
        "noise_tolerance": p.noise, "inherited_error": json_number(p.inherited),
        "growth": json_number(p.growth), "status": status(p), "note": p.note,
        "metrics": _metrics(p.metrics),
    }


def _record(r: Record) -> dict[str, Any]:
    return {"step": r.step, "name": r.name, "call": r.call, "shape": list(r.shape),
            "dtype": r.dtype}


def _side(s: DumpSummary) -> dict[str, Any]:
    return {"path": s.path, "complete": s.complete, "error": s.error, "records": s.records,
            "steps": list(s.steps), "meta": dict(s.meta)}


def statistics_sentence(c: Comparison) -> str:
    """What a match or drift verdict means when statistics measured some pairs."""
    measured = sum(1 for p in c.results if not math.isnan(p.error))
    head = ("every paired tensor's statistics agree within tolerance" if c.evidence ==
            "statistics" else f"{c.by_statistics} of {measured} pairs kept no data and their "
            f"statistics agree within tolerance; the {measured - c.by_statistics} with data: "
            f"{c.verdict}")
    return (f"{head}. No data was compared for those pairs: this is not a match, only the "
            "absence of a difference statistics can show")


def _statistics(c: Comparison) -> dict[str, Any] | None:
    if c.evidence == "data":
        return None
    return {"pairs": c.by_statistics,
            "meaning": statistics_sentence(c) if c.verdict in ("match", "drift") else None,
            "can_show": list(CAN_SHOW), "cannot_show": list(CANNOT_SHOW)}


def report_dict(c: Comparison) -> dict[str, Any]:
    """The whole comparison as the documented JSON object."""
    return {
        "schema": SCHEMA_VERSION,
        "lockstep_version": __version__,
        "verdict": c.verdict,
        "evidence": c.evidence,
        "statistics": _statistics(c),
        "first_divergence": pair_dict(c.first_divergence) if c.first_divergence else None,
        "diagnosis": c.diagnosis.as_dict() if c.diagnosis is not None else None,
        "coverage": c.coverage.as_dict() if c.coverage is not None else None,
        "tokens": c.tokens.as_dict() if c.tokens is not None else None,
        "replay": json_safe(c.replay.to_json()) if c.replay is not None else None,
        "step_match": c.step_match.to_json() if c.step_match is not None else None,
        "ranks": c.ranks.as_dict() if c.ranks is not None else None,
        "chunks": c.chunks.as_dict() if c.chunks is not None else None,
        "precision": c.precision.as_dict() if c.precision is not None else None,
        "reference_dump": _side(c.reference),
        "candidate_dump": _side(c.candidate),
        "summary": {
            "pairs": len(c.results),
            "steps": list(c.steps),
            "over_tolerance": sum(1 for p in c.results if p.over),
            "incomparable": sum(1 for p in c.results if math.isnan(p.error)),
            "reference_only": len(c.ref_only),
            "candidate_only": len(c.cand_only),
        },
        "pairs": [pair_dict(p) for p in c.results],
        "reference_only": [_record(r) for r in c.ref_only],
        "candidate_only": [_record(r) for r in c.cand_only],
    }


def write_json(c: Comparison, path: str | os.PathLike[str]) -> None:
    """Write the report, atomically."""
    write_json_file(report_dict(c), path)


def write_report(report: Any, path: str | os.PathLike[str]) -> None:
    """The ``--json`` face (``report.faces``): any report's ``to_json()``, atomically."""
    write_json_file(report.to_json(), path)
