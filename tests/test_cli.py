"""The command line: capture a saved transformers model, compare, exit codes, JSON report."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from models import save_good_and_bad

LOCKSTEP = str(Path(sys.executable).with_name("lockstep"))


def lockstep(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([LOCKSTEP, *args], capture_output=True, text=True, cwd=cwd,
                          env={"HF_HUB_OFFLINE": "1", "COLUMNS": "120",
                               "PATH": "/usr/bin:/bin"})


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    return save_good_and_bad(tmp_path_factory.mktemp("models"))


def capture(models: Path, name: str, out: Path, *extra: str) -> None:
    res = lockstep("capture", f"hf:{models / name}", "--tokens", "3,17,42,7", "--decode", "2",
                   "--out", str(out), *extra)
    assert res.returncode == 0, res.stderr


def test_capture_compare_match_and_json(models, tmp_path):
    capture(models, "good", tmp_path / "ref")
    capture(models, "good", tmp_path / "cand", "--dtype", "float64")
    res = lockstep("compare", str(tmp_path / "ref"), str(tmp_path / "cand"), "--json",
                   str(tmp_path / "r.json"))
    assert res.returncode == 0, res.stderr
    assert "MATCH" in res.stdout
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["verdict"] == "match" and report["first_divergence"] is None
    assert report["summary"]["steps"] == [0, 1, 2]
    assert report["reference_dump"]["meta"]["prompt_token_ids"] == [3, 17, 42, 7]
    names = {p["reference"] for p in report["pairs"]}
    assert {"input_ids", "model.embed_tokens", ":logits", "model.layers.1.mlp"} <= names


def test_compare_diverged_exit_1_and_first_divergence(models, tmp_path):
    capture(models, "good", tmp_path / "ref")
    capture(models, "bad", tmp_path / "cand")
    res = lockstep("compare", str(tmp_path / "ref"), str(tmp_path / "cand"), "--json",
                   str(tmp_path / "r.json"))
    assert res.returncode == 1, res.stderr
    assert "DIVERGED" in res.stdout and "model.layers.1.mlp.down_proj" in res.stdout
    first = json.loads((tmp_path / "r.json").read_text())["first_divergence"]
    assert (first["step"], first["reference"], first["candidate"]) == (
        0, "model.layers.1.mlp.down_proj", "model.layers.1.mlp.down_proj")
    assert first["status"] == "jump"
    assert first["metrics"]["worst_index"] and first["error"] > 0.1


def test_bfloat16_drift_exit_0(models, tmp_path):
    capture(models, "good", tmp_path / "ref")
    capture(models, "good", tmp_path / "cand", "--dtype", "bfloat16")
    res = lockstep("compare", str(tmp_path / "ref"), str(tmp_path / "cand"))
    assert res.returncode == 0, res.stderr
    assert "DRIFT" in res.stdout


@pytest.mark.parametrize("args, message", [
    (["compare", "/nonexistent/a", "/nonexistent/b"], "no such dump"),
    (["capture", "hf:/nonexistent", "--tokens", "1", "--out", "x"], "is not a directory"),
    (["capture", "zz:/x", "--tokens", "1", "--out", "x"], "unknown engine 'zz'"),
    (["compare", "a", "b", "--tol", "nonsense"], "expected PATTERN=NUMBER"),
])
def test_user_errors_are_one_line_exit_2(tmp_path, args, message):
    res = lockstep(*args, cwd=tmp_path)
    assert res.returncode == 2
    errors = [line for line in res.stderr.splitlines() if line.startswith("lockstep: error:")]
    assert len(errors) == 1 and message in errors[0]
    assert "Traceback" not in res.stderr


def test_show_lists_records(models, tmp_path):
    capture(models, "good", tmp_path / "ref")
    res = lockstep("show", str(tmp_path / "ref"), "--step", "1")
    assert res.returncode == 0, res.stderr
    assert "model.layers.0.self_attn.q_proj" in res.stdout and "complete" in res.stdout


def test_diff_runs_both_engines_on_the_same_tokens(models, tmp_path):
    res = lockstep("diff", f"hf:{models / 'good'}", f"hf:{models / 'bad'}", "--tokens",
                   "3,17,42,7", "--decode", "2", "--out", str(tmp_path / "d"), "--json",
                   str(tmp_path / "r.json"))
    assert res.returncode == 1, res.stderr
    report = json.loads((tmp_path / "r.json").read_text())
    first = report["first_divergence"]
    assert (first["step"], first["reference"]) == (0, "model.layers.1.mlp.down_proj")
    cand_meta = report["candidate_dump"]["meta"]
    assert cand_meta["prompt_token_ids"] == [3, 17, 42, 7]
    # teacher-forced: the candidate was fed the reference's greedy tokens
    ref_meta = report["reference_dump"]["meta"]
    fed = [p for p in report["pairs"] if p["reference"] == "input_ids"]
    assert [p["error"] for p in fed] == [0, 0, 0]
    assert len(ref_meta["generated_token_ids"]) == 3


USER_ENGINE = '''
import torch
from transformers import AutoModelForCausalLM

from lockstep.engines import Engine
from lockstep.engines.hf import forward_step


class Buggy(Engine):
    """A user's engine: the same model, its own greedy loop, one weight off in layer 1."""

    name = "buggy"

    def __init__(self, spec, path):
        super().__init__(spec)
        self.path = path

    def load(self):
        self.model = AutoModelForCausalLM.from_pretrained(self.path).eval()
        with torch.no_grad():
            self.model.model.layers[1].self_attn.v_proj.weight[2, 7] += 1.0

    def tokenize(self, text):
        raise NotImplementedError

    def generate(self, rec, prompt_ids, decode, *, forced=None):
        rec.watch(self.model)
        ids, past, chosen = torch.tensor([list(prompt_ids)]), None, []
        with torch.no_grad():
            for step in range(decode + 1):
                rec.capture("input_ids", ids)
                out, past = forward_step(self.model, ids, past)
                chosen.append(int(out.logits[0, -1].argmax()))
                fed = forced[step] if forced and step < len(forced) else chosen[-1]
                ids = torch.tensor([[fed]])
        return chosen


def make(spec):
    return Buggy(spec, PATH)
'''


def test_diff_against_a_users_python_engine(models, tmp_path):
    (tmp_path / "my_engine.py").write_text(
        USER_ENGINE.replace("PATH)", f"{str(models / 'good')!r})"))
    res = lockstep("diff", f"hf:{models / 'good'}", f"py:{tmp_path / 'my_engine.py'}:make",
                   "--tokens", "3,17,42,7", "--decode", "2", "--out", str(tmp_path / "d"),
                   "--json", str(tmp_path / "r.json"))
    assert res.returncode == 1, res.stderr
    first = json.loads((tmp_path / "r.json").read_text())["first_divergence"]
    assert (first["step"], first["reference"]) == (0, "model.layers.1.self_attn.v_proj")
    bad = lockstep("diff", f"hf:{models / 'good'}", f"py:{tmp_path / 'my_engine.py'}:nothing",
                   "--tokens", "1", "--out", str(tmp_path / "e"))
    assert bad.returncode == 2 and "has no 'nothing'" in bad.stderr


def test_python_dash_m_runs_the_command(tmp_path):
    """``python -m lockstep`` is the command where its script is not on PATH (it was 'No
    module named lockstep.__main__'): the same parser, exit codes and messages."""
    done = subprocess.run([sys.executable, "-m", "lockstep", "compare", str(tmp_path / "a"),
                           str(tmp_path / "b")], capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "no such dump" in done.stderr, done.stderr
    assert done.stdout == "" and "Traceback" not in done.stderr
