"""Coverage is part of the verdict: a comparison that left something decisive uncompared is
``incomplete`` (exit code 3), never match or drift; one pair whose layout does not fit never
aborts a comparison. Dumps are real files: a tiny transformers model recorded with
lockstep.record, and copies of it rewritten by the format-only writer."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pytest

import lockstep
from independent_writer import IndependentWriter
from lockstep.align.layouts import layout_candidates
from models import greedy, tiny

Change = Callable[[Any, np.ndarray], "list[tuple[str, np.ndarray, dict]] | None"]


@pytest.fixture(scope="module")
def ref(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("cov") / "ref"
    greedy(tiny("llama"), path)
    return path


def rewrite(src: Path, dst: Path, change: Change | None = None, **meta: Any) -> Path:
    """A copy of ``src``; ``change(record, array)`` gives the records to write in its place
    ([(name, array, extra fields)], None to drop it)."""
    with lockstep.open_dump(src) as dump:
        w = IndependentWriter(str(dst), meta={**dump.meta, **meta})
        for rec in dump:
            arr = np.ascontiguousarray(dump.read(rec))
            out = [(rec.name, arr, {})] if change is None else change(rec, arr)
            for name, a, extra in out or ():
                a = np.ascontiguousarray(a)
                w.tensor(name, rec.step, str(a.dtype), list(a.shape), raw=a.tobytes(),
                         call=rec.call, stats=None, **extra)
        w.end()
    return dst


def cli(*args: str) -> subprocess.CompletedProcess:
    """``python -m lockstep.cli.main`` on the lockstep under test."""
    src = str(Path(lockstep.__file__).resolve().parents[1])
    env = {**os.environ, "PYTHONPATH": src, "COLUMNS": "120", "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-m", "lockstep.cli.main", *args],
                          capture_output=True, text=True, env=env)


def padded_logits(rec, arr):
    """The candidate's logits named ``logits``, over a vocabulary padded by 8 columns."""
    if rec.name == ":logits":
        return None
    if rec.name == "lm_head":
        pad = np.zeros(arr.shape[:-1] + (8,), arr.dtype)
        return [("logits", np.concatenate([arr, pad], axis=-1), {})]
    return [(rec.name, arr, {})]


def test_unpaired_logits_is_incomplete_exit_3_and_the_rule_pairs_them(ref, tmp_path):
    cand = rewrite(ref, tmp_path / "cand", padded_logits)
    res = cli("compare", str(ref), str(cand), "--json", str(tmp_path / "r.json"))
    assert res.returncode == 3, res.stdout + res.stderr
    assert "Traceback" not in res.stderr
    assert "INCOMPLETE" in res.stdout and "the logits (lm_head) were not compared" in res.stdout
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["verdict"] == "incomplete"
    cov = report["coverage"]
    assert cov["complete"] is False
    gap = cov["incomplete_because"][0]
    assert gap["what"] == "logits" and gap["records"] == ["lm_head@0"]
    assert gap["closest"][0]["candidate"] == "logits"
    assert [s["unpaired"] for s in cov["steps"]] == [1, 1, 1, 1]
    # the rule it suggests is a valid mapping file that pairs them: then it matches
    (tmp_path / "map.toml").write_text(gap["rule"] + "\n")
    again = cli("compare", str(ref), str(cand), "--mapping", str(tmp_path / "map.toml"),
                "--json", str(tmp_path / "r2.json"))
    assert again.returncode == 0, again.stdout + again.stderr
    assert json.loads((tmp_path / "r2.json").read_text())["verdict"] == "match"


def test_a_divergence_found_still_wins_over_incomplete(ref, tmp_path):
    def broken(rec, arr):
        out = padded_logits(rec, arr)
        if out and rec.name == "model.layers.1.mlp.down_proj":
            return [(rec.name, arr * 1.5, {})]
        return out

    result = lockstep.compare(ref, rewrite(ref, tmp_path / "cand", broken))
    assert result.verdict == "diverged"
    assert result.first_divergence.ref_name == "model.layers.1.mlp.down_proj"
    assert not result.coverage.complete  # still said, beside the divergence


def test_an_unpaired_whole_layer_is_incomplete(ref, tmp_path):
    cand = rewrite(ref, tmp_path / "cand", lambda rec, arr: None if rec.name.startswith(
        "model.layers.1") and rec.step > 0 else [(rec.name, arr, {})])
    result = lockstep.compare(ref, cand)
    assert result.verdict == "incomplete" and not result
    gaps = result.coverage.gaps
    assert [g.what for g in gaps] == ["layer"]
    assert "layer 1 of the reference" in gaps[0].reason and "steps 1-3" in gaps[0].reason
    layers = {c.key: c for c in result.coverage.layers}
    assert layers[0].unpaired == 0 and layers[1].paired > 0 and layers[1].unpaired > 0


KEEP = ("input_layernorm", "self_attn.q_proj", "mlp.down_proj")


def test_more_than_a_fifth_of_the_layer_records_unpaired_is_incomplete(ref, tmp_path):
    """Every layer keeps a few records as they are (no whole layer is lost); the others are
    recorded under names nothing pairs, with values that agree with nothing: left unpaired
    beside reference records of their size, they make it incomplete."""
    rng = np.random.default_rng(0)

    def garbled(rec, arr):
        if rec.name.startswith("model.layers.") and not rec.name.endswith(KEEP) and \
                arr.dtype.kind == "f":
            return [(f"scratch/{rec.seq}", rng.standard_normal(arr.shape).astype(arr.dtype),
                     {})]
        return [(rec.name, arr, {})]

    result = lockstep.compare(ref, rewrite(ref, tmp_path / "cand", garbled))
    assert result.verdict == "incomplete"
    assert [g.what for g in result.coverage.gaps] == ["layers"]


def test_a_candidate_that_records_fewer_ops_is_not_incomplete(ref, tmp_path):
    """An engine that records a few ops of each layer, every one of them paired: the
    reference's other records had nothing to pair with (the C engine beside llama.cpp's
    steps inside an op was INCOMPLETE, 28%). The decisive line says how many."""
    def sparse(rec, arr):
        if rec.name.startswith("model.layers.") and not rec.name.endswith(KEEP):
            return None
        return [(rec.name, arr, {})]

    result = lockstep.compare(ref, rewrite(ref, tmp_path / "cand", sparse))
    assert result.verdict == "match", result.coverage.gaps
    share = result.coverage.decisive[-1]
    assert share.startswith("at most 20% of the reference's layer records uncompared: 0 of ")
    assert "more have no unpaired candidate record of their size at their step" in share


def test_one_rank_all_unpaired_is_incomplete(ref, tmp_path):
    two_ranks = rewrite(ref, tmp_path / "tp", lambda rec, arr: [
        (rec.name, arr, {"rank": 0}), (rec.name, arr, {"rank": 1})])
    result = lockstep.compare(ref, two_ranks)
    assert result.verdict == "incomplete"
    rank = [g for g in result.coverage.gaps if g.what == "rank"]
    assert len(rank) == 1 and rank[0].reason.startswith("rank 1 of the candidate")
    counts = {c.key: c for side, c in result.coverage.ranks if side == "candidate"}
    assert counts[0].paired > 0 and counts[1].paired == 0
    # both sides with both ranks: each record pairs with its own rank, once
    both = lockstep.compare(two_ranks, two_ranks)
    assert both.verdict == "match" and not both.ref_only and not both.cand_only
    assert len({(p.ref_seq, p.cand_seq) for p in both.results}) == len(both.results)
    assert all(p.ref_seq == p.cand_seq for p in both.results)


def test_candidate_only_extras_do_not_make_it_incomplete(ref, tmp_path):
    def extras(rec, arr):  # an engine's own graph nodes: views, scratch buffers
        out = [(rec.name, arr, {})]
        if rec.name.endswith("self_attn.k_proj"):
            layer = rec.name.split(".")[2]
            out += [(f"cache_k_view-{layer}-{i}", np.zeros((3, 5), np.float32), {})
                    for i in range(4)]
        return out

    result = lockstep.compare(ref, rewrite(ref, tmp_path / "cand", extras))
    assert len(result.cand_only) == 4 * 2 * 4  # 4 views x 2 layers x 4 steps
    assert result.verdict == "match" and result.coverage.complete


def test_a_transform_that_does_not_fit_makes_that_pair_incomparable(ref, tmp_path):
    """The candidate keeps the last position's logits only. Paired automatically, the last
    row is compared at every step (the whole tensor at decode); a mapping rule whose block
    (the 7th of 7 rows) does not fit a decode step's single row makes those pairs
    incomparable, with the reason; everything else is compared; the logits being decisive,
    it is incomplete."""
    def last_row(rec, arr):
        if rec.name == ":logits":
            return None
        if rec.name == "lm_head":
            return [("logits", arr[:, -1:, :], {})]
        return [(rec.name, arr, {})]

    cand = rewrite(ref, tmp_path / "cand", last_row)
    auto = lockstep.compare(ref, cand)
    assert auto.verdict == "match"
    assert [p.error for p in auto.results if p.cand_name == "logits"] == [0.0] * 4
    (tmp_path / "m.toml").write_text(
        "[[rule]]\ncand = 'logits'\nref = 'lm_head'\nref_transform = 'block(160, 6)'\n")
    res = cli("compare", str(ref), str(cand), "--json", str(tmp_path / "r.json"),
              "--mapping", str(tmp_path / "m.toml"))
    assert res.returncode == 3, res.stdout + res.stderr
    assert "Traceback" not in res.stderr
    report = json.loads((tmp_path / "r.json").read_text())
    logits = [p for p in report["pairs"] if p["candidate"] == "logits"]
    assert [p["status"] for p in logits] == ["match"] + ["incomparable"] * 3
    assert all("does not fit" in p["note"] and "block(160, 6)" in p["note"]
               for p in logits[1:])
    others = [p for p in report["pairs"] if p["candidate"] != "logits"]
    assert len(others) > 100 and all(p["status"] == "match" for p in others)
    gap = report["coverage"]["incomplete_because"][0]
    assert gap["what"] == "logits" and "steps 1-3" in gap["reason"]


def test_a_mapping_transform_that_fits_only_prefill_leaves_the_rest_compared(ref, tmp_path):
    cand = rewrite(ref, tmp_path / "cand", lambda rec, arr: [
        ("up0" if rec.name == "model.layers.0.mlp.up_proj" else rec.name, arr, {})])
    (tmp_path / "map.toml").write_text(
        "[[rule]]\ncand = 'up0'\nref = 'model.layers.0.mlp.up_proj'\n"
        "transform = 'flatten'\nref_transform = 'block(672, 0)'\n")
    res = cli("compare", str(ref), str(cand), "--mapping", str(tmp_path / "map.toml"),
              "--json", str(tmp_path / "r.json"))
    assert res.returncode == 0, res.stdout + res.stderr
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["verdict"] == "match"
    up = [p for p in report["pairs"] if p["candidate"] == "up0"]
    assert [p["status"] for p in up] == ["match", "incomparable", "incomparable",
                                         "incomparable"]
    assert "block(672, 0) is outside a tensor of 96 elements" in up[1]["note"]


def test_zero_size_tensors_never_abort_pairing(tmp_path):
    assert layout_candidates((3, 0), (0, 4)) == []  # was a ZeroDivisionError
    for side, shape in (("ref", [3, 0]), ("cand", [0, 4])):
        w = IndependentWriter(str(tmp_path / side), meta={"engine": side})
        w.tensor("empty", 0, "float32", shape, [])
        w.tensor("x", 0, "float32", [2], [1.0, 2.0])
        w.end()
    result = lockstep.compare(tmp_path / "ref", tmp_path / "cand")
    assert {p.ref_name for p in result.results} == {"empty", "x"}
    assert result.verdict == "match"


# -- tokens are part of the verdict ------------------------------------------------------------
def _argmax_tokens(path: Path) -> list[int]:
    with lockstep.open_dump(path) as dump:
        return [int(np.argmax(dump.read(dump.get(step, "lm_head"))[0, -1]))
                for step in dump.steps]


def test_a_greedy_token_off_its_own_argmax_is_diverged_with_a_sampling_diagnosis(tmp_path):
    """The zoo's bad_temperature sampler, run by `lockstep diff` beside transformers: every
    tensor agrees, the chosen token is not the argmax of the candidate's own logits."""
    from lockstep.zoo.score import tiny_model

    model = tiny_model("llama", tmp_path / "model")
    res = cli("diff", f"hf:{model}", f"zoo:{model}", "--tokens", "3,17,42,7,99", "--decode",
              "2", "--cand-opt", "bug=bad_temperature", "--out", str(tmp_path / "out"),
              "--json", str(tmp_path / "r.json"))
    assert res.returncode == 1, res.stdout + res.stderr
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["verdict"] == "diverged"
    assert all(p["status"] == "match" for p in report["pairs"])  # the tensors agree
    tokens = report["tokens"]
    off = tokens["off_argmax"]
    assert [o["step"] for o in off] == [0, 1, 2]
    assert [o["chosen"] for o in off] == tokens["candidate"]
    assert all(o["argmax"] != o["chosen"] and o["gap"] > 0 for o in off)
    diagnosis = report["diagnosis"]
    assert diagnosis["kind"] == "sampling"
    assert diagnosis["detail"]["argmax"] == off[0]["argmax"]
    assert report["first_divergence"]["step"] == 0
    assert report["first_divergence"]["canonical"] == "logits"
    assert "SAMPLING" in res.stdout


def test_tokens_that_differ_while_the_tensors_match_are_never_a_match(ref, tmp_path):
    tokens = _argmax_tokens(ref)
    reference = rewrite(ref, tmp_path / "ref", generated_token_ids=tokens)
    assert lockstep.compare(reference, reference).verdict == "match"
    other = tokens[:1] + [(tokens[1] + 1) % 160] + tokens[2:]
    cand = rewrite(ref, tmp_path / "cand", generated_token_ids=other)
    result = lockstep.compare(reference, cand)
    assert result.verdict == "diverged" and not result
    assert result.tokens.split == 1 and [o.step for o in result.tokens.off_argmax] == [1]
    assert result.first_divergence.step == 1 and result.first_divergence.ref_name == "lm_head"
    assert result.diagnosis.kind == "sampling"

    # no logits recorded on either side: the tokens alone say it
    def no_logits(rec, arr):
        return None if rec.name in ("lm_head", ":logits") else [(rec.name, arr, {})]

    bare_ref = rewrite(ref, tmp_path / "bare_ref", no_logits, generated_token_ids=tokens)
    bare = rewrite(ref, tmp_path / "bare", no_logits, generated_token_ids=other)
    result = lockstep.compare(bare_ref, bare)
    assert result.verdict == "diverged" and result.first_divergence is None
    assert result.diagnosis.kind == "sampling"
    assert result.diagnosis.detail == {"step": 1, "reference_token": tokens[1],
                                       "candidate_token": other[1]}


def test_a_chosen_token_whose_logit_is_nan_has_no_gap(tmp_path):
    """Off its argmax because its own logit is NaN: the gap is not measurable (``nan``),
    not an infinite preference."""
    from lockstep.compare.tokens import check_tokens
    from lockstep.store import DumpWriter

    logits = np.zeros((1, 1, 8), np.float32)
    logits[0, 0, 3] = 2.0
    logits[0, 0, 5] = np.nan
    w = DumpWriter(tmp_path / "cand", {"engine": "t", "model": "m",
                                      "generated_token_ids": [5]})
    w.write("lm_head", 0, "float32", logits.shape, logits.tobytes())
    w.close()
    with lockstep.open_dump(tmp_path / "cand") as cand:
        (off,) = check_tokens(cand, cand).off_argmax
        assert (off.chosen, off.argmax) == (5, 3) and np.isnan(off.gap)
        assert check_tokens(cand, cand).as_dict()["off_argmax"][0]["gap"] == "nan"


def test_a_token_off_its_own_argmax_is_never_audited_as_precision(tmp_path):
    """A lower-precision candidate (its tensors over tolerance, with no jump) whose greedy
    token is off its own argmax: a sampler bug, which the amplified-precision audit must not
    turn into drift."""
    from lockstep.replay.audit import applies
    from lockstep.store import DumpWriter

    rng = np.random.default_rng(3)
    hidden = rng.standard_normal((1, 4, 16)).astype(np.float32)
    logits = rng.standard_normal((1, 4, 8)).astype(np.float32)
    logits[0, -1, 3] = 9.0
    for side, noise, token in (("ref", 0.0, 3), ("cand", 2e-3, 5)):
        w = DumpWriter(tmp_path / side, {"engine": "t", "model": "m",
                                         "generated_token_ids": [token]})
        for name, value in (("model.layers.0", hidden), ("lm_head", logits)):
            bumped = value + np.float32(noise) * rng.standard_normal(value.shape).astype(
                np.float32)
            w.write(name, 0, "float32", value.shape, bumped.astype(np.float32).tobytes())
        w.close()
    result = lockstep.compare(tmp_path / "ref", tmp_path / "cand", cand_precision="bfloat16")
    assert result.verdict == "diverged" and result.tokens.off_argmax
    assert any(p.over for p in result.results) and not any(p.jump for p in result.results)
    assert not applies(result)
