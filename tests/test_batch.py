"""Batched runs against one-at-a-time references (issue 21): the zoo's batch bugs each found
in the right sequence with a diagnosis naming the pair, bug-free batches (both padding sides,
a request joining mid-decode) never diverged, packed and padded layouts split per sequence
with the padding ignored, and the command line's --batch."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import lockstep
from lockstep.batching.split import split_batch
from lockstep.capture.recorder import record
from lockstep.compare import compare
from lockstep.zoo.batch_bugs import BATCH_BUGS, BATCH_PROMPTS
from lockstep.zoo.batch_score import BATCH_FAMILY, CONTROL_RUNS, run_batch_zoo
from lockstep.zoo.score import FORCED, tiny_model

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("batch")


@pytest.fixture(scope="module")
def model(root: Path) -> Path:
    return tiny_model(BATCH_FAMILY, root / "models" / BATCH_FAMILY)


@pytest.fixture(scope="module")
def score(root: Path, model: Path):
    return run_batch_zoo(root)


@pytest.mark.parametrize("name", list(BATCH_BUGS))
def test_batch_bug_is_found_in_its_sequence_and_names_the_pair(score, name):
    result = next(r for r in score.results if r.bug.name == name)
    bug = BATCH_BUGS[name]
    assert result.verdict == "diverged"
    assert (result.sequence, result.step, result.tensor) == (bug.sequence, bug.step,
                                                             bug.tensor), result
    assert (result.diagnosis, result.named) == (bug.diagnosis, bug.pair), result.title
    assert result.ok


def test_bug_free_batches_do_not_diverge(score):
    assert len(score.controls) == len(CONTROL_RUNS)
    for control in score.controls:
        assert control.verdict in ("match", "drift"), control


@pytest.mark.parametrize("name", list(BATCH_BUGS))
def test_batch_bugs_hide_in_a_one_prompt_run(tmp_path, model, name):
    """Each batch bug needs a batch: the same engine on one prompt matches transformers."""
    from lockstep.workflows.diff import diff

    result = diff(f"hf:{model}", f"zoo:{model}", tmp_path, tokens=BATCH_PROMPTS[1],
                  decode=len(FORCED), cand_options={"bug": name}, replay=False)
    assert result.verdict == "match", (name, result.first_divergence)


# -- layouts: records written by hand, as an engine of any kind would record them -----------
def _solo(path: Path, values: list[np.ndarray], prompt: list[int]) -> Path:
    """A one-prompt dump: per step, ``layers.0.out`` (1, tokens, 8)."""
    with record(path, meta={"prompt_token_ids": prompt}, overwrite=True) as rec:
        for v in values:
            with rec.step():
                rec.capture("layers.0.out", v[None])
    return path


def _sequences(rng: np.random.Generator) -> tuple[list[list[int]], list[list[np.ndarray]]]:
    prompts = [[5, 6, 7, 8, 9], [1, 2]]
    # prefill (all prompt tokens), then one decode step of one token
    values = [[rng.standard_normal((len(p), 8)).astype(np.float32),
               rng.standard_normal((1, 8)).astype(np.float32)] for p in prompts]
    return prompts, values


def test_packed_layout_with_cu_seqlens_splits_per_sequence(tmp_path):
    prompts, values = _sequences(np.random.default_rng(0))
    refs = [_solo(tmp_path / f"ref-{i}", v, p) for i, (v, p) in enumerate(zip(values, prompts))]
    wrong = values[1][0] + 0.5  # the second sequence's prefill, off
    batch = {"layout": "packed", "prompts": prompts, "steps": [{"rows": [0, 1]}] * 2}
    for name, second in (("good", values[1][0]), ("bad", wrong)):
        with record(tmp_path / name, meta={"batch": batch}, overwrite=True) as rec:
            with rec.step():  # (tokens, hidden), the boundaries recorded as a probe
                rec.capture("cu_seqlens", np.array([0, 5, 7], dtype=np.int32))
                rec.capture("layers.0.out", np.concatenate([values[0][0], second]))
            with rec.step():
                rec.capture("cu_seqlens", np.array([0, 1, 2], dtype=np.int32))
                rec.capture("layers.0.out", np.concatenate([values[0][1], values[1][1]]))
        parts = split_batch(tmp_path / name, tmp_path / f"{name}-split")
        verdicts = [compare(r, c).verdict for r, c in zip(refs, parts)]
        assert verdicts == (["match", "match"] if name == "good" else ["match", "diverged"])
    with lockstep.open_dump(parts[1]) as part:
        assert part.meta["prompt_token_ids"] == [1, 2]
        assert part.meta["batch_sequence"]["sequence"] == 1
        assert [r.shape for r in part.records] == [(2, 8), (1, 8)]


@pytest.mark.parametrize("padding", ["left", "right"])
def test_padded_layout_ignores_the_padding(tmp_path, padding):
    prompts, values = _sequences(np.random.default_rng(1))
    refs = [_solo(tmp_path / f"ref-{i}", v, p) for i, (v, p) in enumerate(zip(values, prompts))]
    starts = [0, 3] if padding == "left" else [0, 0]
    batch = {"layout": "padded", "padding": padding, "prompts": prompts,
             "steps": [{"rows": [0, 1], "width": 5, "start": starts, "length": [5, 2]},
                       {"rows": [0, 1], "width": 1, "start": [0, 0], "length": [1, 1]}]}
    padded = np.full((2, 5, 8), np.nan, dtype=np.float32)  # NaN padding: never compared
    padded[0] = values[0][0]
    padded[1, starts[1]:starts[1] + 2] = values[1][0]
    with record(tmp_path / "batch", meta={"batch": batch}, overwrite=True) as rec:
        with rec.step():
            rec.capture("layers.0.out", padded)
        with rec.step():
            rec.capture("layers.0.out", np.stack([values[0][1], values[1][1]]))
    parts = split_batch(tmp_path / "batch", tmp_path / "split")
    assert [compare(r, c).verdict for r, c in zip(refs, parts)] == ["match", "match"]


def test_a_sequence_carrying_anothers_values_is_a_leak(tmp_path):
    """Any engine's batch, recorded by hand: sequence 1's decode step holds sequence 0's."""
    prompts, values = _sequences(np.random.default_rng(2))
    refs = [_solo(tmp_path / f"ref-{i}", v, p) for i, (v, p) in enumerate(zip(values, prompts))]
    batch = {"layout": "packed", "prompts": prompts,
             "steps": [{"rows": [0, 1], "cu_seqlens": [0, 5, 7]},
                       {"rows": [0, 1], "cu_seqlens": [0, 1, 2]}]}
    with record(tmp_path / "batch", meta={"batch": batch}, overwrite=True) as rec:
        with rec.step():
            rec.capture("layers.0.out", np.concatenate([values[0][0], values[1][0]]))
        with rec.step():
            rec.capture("layers.0.out", np.concatenate([values[0][1], values[0][1]]))
    parts = split_batch(tmp_path / "batch", tmp_path / "split", references=[str(r)
                                                                            for r in refs])
    result = compare(refs[1], parts[1])
    assert (result.verdict, result.first_divergence.step) == ("diverged", 1)
    assert result.diagnosis.kind == "batch_leak"
    assert result.diagnosis.detail["sequences"] == [1, 0]
    assert compare(refs[0], parts[0]).verdict == "match"


# -- the command line ------------------------------------------------------------------------
def _cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "COLUMNS": "160"}
    return subprocess.run([sys.executable, "-m", "lockstep.cli.main", *args],
                          capture_output=True, text=True, cwd=cwd, env=env)


def test_diff_batch_names_the_sequences_and_writes_each_report(tmp_path, model):
    tokens = [",".join(map(str, p)) for p in BATCH_PROMPTS]
    run = _cli("diff", f"hf:{model}", f"zoo:{model}", "--batch", "--tokens", tokens[0],
               "--tokens", tokens[1], "--decode", "2", "--cand-opt", "bug=batch_shared_kv",
               "--out", "out", "--json", "report.json", cwd=tmp_path)
    assert run.returncode == 1, run.stderr
    assert "BATCH_KV_SHARED" in run.stdout and "sequences 0 and 1" in run.stdout
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["kind"] == "batch" and report["diverged"] == [0]
    assert [s["report"]["verdict"] for s in report["sequences"]] == ["diverged", "match"]
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [
        "candidate-0.lsd", "candidate-1.lsd", "candidate.lsd", "reference-0.lsd",
        "reference-1.lsd"]


def test_capture_batch_with_a_request_joining(tmp_path, model):
    run = _cli("capture", f"zoo:{model}", "--batch", "--tokens", "3,17,42,7", "--tokens",
               "11,250", "--decode", "2", "--padding", "right", "--join-at", "1",
               "--out", "batch.lsd", cwd=tmp_path)
    assert run.returncode == 0, run.stderr
    with lockstep.open_dump(tmp_path / "batch.lsd") as dump:
        steps = dump.meta["batch"]["steps"]
    assert dump.meta["batch"]["join_at"] == [0, 1]
    assert [s["rows"] for s in steps] == [[0], [0, 1], [0, 1], [1]]
    assert steps[1]["length"] == [1, 2] and steps[1]["start"] == [0, 0]
    # a request arriving after the others finished runs at the next forward
    run = _cli("capture", f"zoo:{model}", "--batch", "--tokens", "3,17", "--tokens", "11",
               "--decode", "1", "--join-at", "9", "--out", "late.lsd", cwd=tmp_path)
    assert run.returncode == 0, run.stderr
    with lockstep.open_dump(tmp_path / "late.lsd") as dump:
        assert dump.meta["batch"]["join_at"] == [0, 2]
        assert [s["rows"] for s in dump.meta["batch"]["steps"]] == [[0], [0], [1], [1]]
        assert dump.steps == [0, 1, 2, 3]


@pytest.mark.parametrize("args, message", [
    (["--tokens", "1,2", "--tokens", "3,4"], "several prompts need --batch"),
    (["--batch", "--tokens", "1,2"],
     "--batch needs two or more prompts: repeat --prompt or --tokens"),
    (["--tokens", "1,2", "--join-at", "1"], "--join-at needs --batch"),
])
def test_batch_mistakes_are_one_line(tmp_path, model, args, message):
    run = _cli("diff", f"hf:{model}", f"zoo:{model}", *args, cwd=tmp_path)
    assert run.returncode == 2 and run.stderr.strip() == f"lockstep: error: {message}"


def test_an_engine_that_cannot_batch_says_so(tmp_path, model):
    run = _cli("diff", f"zoo:{model}", f"hf:{model}", "--batch", "--tokens", "1,2",
               "--tokens", "3", cwd=tmp_path)
    assert run.returncode == 2
    assert run.stderr.strip().splitlines()[-1] == (
        f"lockstep: error: hf:{model}: the transformers engine cannot run a batch (--batch); "
        "the zoo engine can")


def test_generate_batch_splits_only_with_a_batch_bug(tmp_path, model):
    from lockstep.generation import Prompt, check_generation

    prompts = [Prompt(tokens=tuple(p)) for p in BATCH_PROMPTS]
    results = {}
    for bug in (None, "batch_logits_wrong_row"):
        results[bug] = check_generation(
            f"hf:{model}", f"zoo:{model}", prompts, max_new_tokens=3, out=tmp_path / str(bug),
            cand_options={"bug": bug} if bug else {}, batch={"padding": "right"})
    assert [p.diverged_step for p in results[None].prompts] == [None, None]
    wrong = results["batch_logits_wrong_row"].prompts
    assert [p.diverged_step for p in wrong] == [0, 0]
    assert wrong[0].localization.comparison.diagnosis.kind == "batch_leak"


def test_zoo_batch_bugs_need_the_llama_model(capsys):
    from lockstep.cli.main import main

    assert main(["zoo", "--family", "qwen3", "--bug", "batch_shared_kv"]) == 2
    assert capsys.readouterr().err.strip() == (
        "lockstep: error: the batch bugs (batch_shared_kv) run on the llama model: add "
        "--family llama")
