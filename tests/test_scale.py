"""Huge runs: stats-only comparison, capture selection by glob and layer, the dry-run estimate.

A real tiny transformers model saved to disk, captured through the command line and the
capture workflow."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import lockstep
from lockstep.align.structure import layer_of
from lockstep.store import open_dump
from lockstep.workflows.capture import capture
from lockstep.workflows.estimate import estimate
from models import save_good_and_bad

pytestmark = pytest.mark.usefixtures("one_thread")

TOKENS = [3, 17, 42, 7, 99]


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "lockstep.cli.main", *args],
                          capture_output=True, text=True,
                          env={**os.environ, "COLUMNS": "160", "HF_HUB_OFFLINE": "1"})


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    return save_good_and_bad(tmp_path_factory.mktemp("models"))


def rec(models: Path, name: str, out: Path, **kw) -> Path:
    capture(f"hf:{models / name}", str(out), tokens=TOKENS, decode=2, **kw)
    return out


def names(path: Path) -> set[str]:
    with open_dump(path) as d:
        return {r.name for r in d.records}


# -- statistics --------------------------------------------------------------------------------

def test_stats_only_against_full_says_statistics_agree(models, tmp_path):
    full = rec(models, "good", tmp_path / "full")
    stats = rec(models, "good", tmp_path / "stats", data=False)
    res = cli("compare", str(full), str(stats), "--json", str(tmp_path / "r.json"))
    assert res.returncode == 0, res.stderr
    assert "STATISTICS AGREE" in res.stdout and "MATCH" not in res.stdout
    assert "statistics cannot show" in res.stdout and "permutation" in res.stdout
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["evidence"] == "statistics"
    assert "not a match" in report["statistics"]["meaning"]
    assert report["statistics"]["pairs"] == len(report["pairs"]) > 20
    assert {p["status"] for p in report["pairs"]} == {"statistics agree"}
    assert all(p["metrics"] is None for p in report["pairs"])
    # two full dumps: the same comparison is a match, measured from the data
    both = lockstep.compare(full, full)
    assert both.verdict == "match" and both.evidence == "data"


def test_stats_only_dumps_show_a_scale_bug(models, tmp_path):
    good = rec(models, "good", tmp_path / "good", data=False)
    bad = rec(models, "bad", tmp_path / "bad", data=False)
    c = lockstep.compare(good, bad)
    assert c.verdict == "diverged" and c.evidence == "statistics"
    assert c.first_divergence is not None
    assert c.first_divergence.ref_name == "model.layers.1.mlp.down_proj"
    assert c.first_divergence.step == 0 and c.first_divergence.metrics is None


def test_statistics_cannot_see_a_permutation(tmp_path):
    # the limit the report states: reversed elements keep every statistic
    x = torch.randn(4, 64, generator=torch.Generator().manual_seed(1))
    for data in (False, True):
        for side, value in (("ref", x), ("cand", x.flip(-1))):
            with lockstep.record(tmp_path / f"{side}{data}", data=data) as r:
                r.capture("layer.0.out", value)
    blind = lockstep.compare(tmp_path / "refFalse", tmp_path / "candFalse")
    seen = lockstep.compare(tmp_path / "refTrue", tmp_path / "candTrue")
    assert blind.verdict == "match" and blind.evidence == "statistics"
    assert seen.verdict == "diverged" and seen.evidence == "data"


def test_statistics_show_nan_and_a_zeroed_tensor(tmp_path):
    x = torch.randn(8, 32, generator=torch.Generator().manual_seed(2))
    y = x.clone()
    y[0, :16] = 0.0  # a quarter of a row zeroed: mean and std barely move, the zero count does
    z = x.clone()
    z[3, 3] = float("nan")
    for name, value in (("ref", x), ("zeroed", y), ("nan", z)):
        with lockstep.record(tmp_path / name, data=False) as r:
            r.capture("t", value)
    zeroed = lockstep.compare(tmp_path / "ref", tmp_path / "zeroed")
    nan = lockstep.compare(tmp_path / "ref", tmp_path / "nan")
    assert zeroed.results[0].error == pytest.approx(16 / 256)
    assert nan.results[0].error == float("inf") and nan.verdict == "diverged"


# -- selection ---------------------------------------------------------------------------------

def test_layer_range_keeps_those_layers_and_the_rest(models, tmp_path):
    every = names(rec(models, "good", tmp_path / "all"))
    one = names(rec(models, "good", tmp_path / "one", layers=[1]))
    assert {layer_of(n)[0] for n in every} == {None, 0, 1}
    assert {layer_of(n)[0] for n in one} == {None, 1}
    assert {n for n in every if layer_of(n)[0] is None} <= one  # embeddings, norm, logits
    assert one == {n for n in every if layer_of(n)[0] in (None, 1)}


def test_select_glob_and_layers_from_the_command_line(models, tmp_path):
    res = cli("capture", f"hf:{models / 'good'}", "--tokens", "3,17,42", "--out",
              str(tmp_path / "sel"), "--select", "model.layers.*.mlp*", "--layers", "0")
    assert res.returncode == 0, res.stderr
    got = names(tmp_path / "sel")
    assert got == {"input_ids", "model.layers.0.mlp", "model.layers.0.mlp.gate_proj",
                   "model.layers.0.mlp.up_proj", "model.layers.0.mlp.down_proj",
                   "model.layers.0.mlp.act_fn", "model.layers.0.mlp.down_proj:input.0"}
    bad = cli("capture", f"hf:{models / 'good'}", "--tokens", "3", "--out",
              str(tmp_path / "x"), "--layers", "3-1")
    assert bad.returncode == 2 and bad.stderr.startswith("lockstep: error: --layers")
    assert "Traceback" not in bad.stderr and not (tmp_path / "x").exists()


def test_diff_passes_the_selection_to_both_engines(models, tmp_path):
    res = cli("diff", f"hf:{models / 'good'}", f"hf:{models / 'bad'}", "--tokens", "3,17,42",
              "--out", str(tmp_path / "d"), "--layers", "1", "--exclude", "*act_fn",
              "--no-replay")
    assert res.returncode == 1, res.stderr + res.stdout
    for side in ("reference", "candidate"):
        got = names(tmp_path / "d" / f"{side}.lsd")
        assert "model.layers.1.mlp" in got and "model.layers.1.mlp.act_fn" not in got
        assert not any(layer_of(n)[0] == 0 for n in got)


# -- the dry-run estimate ----------------------------------------------------------------------

def dump_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.iterdir())


@pytest.mark.parametrize("options", [{}, {"layers": [0], "exclude": ["*:input*"]},
                                     {"data": False}])
def test_estimate_is_the_real_size(models, tmp_path, options):
    est = estimate(f"hf:{models / 'good'}", tokens=TOKENS, decode=2, **options)
    real = dump_bytes(rec(models, "good", tmp_path / "real", **options))
    assert [s.step for s in est.steps] == [0, 1, 2]
    assert abs(est.total - real) / real < 0.03, (est.total, real)
    if options.get("data", True):  # the data is exact; only header digits may differ
        with open_dump(tmp_path / "real") as d:
            assert sum(s.data_bytes for s in est.steps) == (tmp_path / "real" / "data.bin"
                                                            ).stat().st_size
            assert est.steps[0].records == sum(1 for r in d.records if r.step == 0)


def test_dry_run_prints_bytes_per_step_and_writes_nothing(models, tmp_path):
    out = tmp_path / "never"
    res = cli("capture", f"hf:{models / 'good'}", "--tokens", "3,17,42,7,99", "--decode", "2",
              "--out", str(out), "--dry-run")
    assert res.returncode == 0, res.stderr
    assert not out.exists()
    lines = res.stdout.splitlines()
    assert "5 prompt tokens + 2 decode steps" in lines[0]
    assert lines[1].startswith("  step 0 (prefill, 5 tokens):")
    assert lines[3].startswith("  step 2 (decode):")
    total = int(lines[-1].split("(")[1].split()[0])
    real = dump_bytes(rec(models, "good", tmp_path / "real"))
    assert abs(total - real) / real < 0.03
