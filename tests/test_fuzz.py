"""``lockstep fuzz``: the inputs it tries, its shrinking, and the zoo's boundary bugs, each
found within the default budget and shrunk to its expected minimal input; the bug-free zoo
gives no failure."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from lockstep.fuzz import FuzzInput, Space, fuzz
from lockstep.fuzz.inputs import boundary_lengths, generate
from lockstep.fuzz.shrink import shrink
from lockstep.zoo.boundary_bugs import BOUNDARY_BUGS, boundary_model

pytestmark = pytest.mark.usefixtures("one_thread")

SPACE = Space(vocab=320, context=512, block=16, max_length=512, special={"bos": 1, "eos": 2})


def test_boundary_lengths_cover_powers_of_two_the_block_and_the_context():
    lengths = boundary_lengths(SPACE)
    for n in (1, 2, 15, 16, 17, 127, 128, 129, 255, 256, 257, 511, 512):
        assert n in lengths
    assert max(lengths) == 512 and 513 not in lengths


def test_the_seed_makes_the_inputs():
    a, b, c = generate(SPACE, 64, 0), generate(SPACE, 64, 0), generate(SPACE, 64, 1)
    assert a == b and a != c and len(a) == 64
    assert a[1] == FuzzInput((), 1, "empty prompt")
    assert all(x.positions <= 512 for x in a)
    whys = " ".join(x.why for x in a)
    assert "repeated" in whys and "bos (1) inside" in whys and "eos (2) inside" in whys
    assert any(x.positions == 512 and x.steps > 1 for x in a)  # decode up to the limit


def test_shrinking_finds_the_smallest_input_that_still_fails():
    def fails(x: FuzzInput) -> bool:  # fails from 17 positions on, when token 7 is there
        return x.positions >= 17 and 7 in x.tokens

    start = FuzzInput(tuple(range(30)), 5)
    small, checks = shrink(start, fails)
    assert (len(small.tokens), small.steps) == (17, 1)
    assert sorted(small.tokens) == [0] * 16 + [7]  # every token but the one it needs zeroed
    assert shrink(start, fails) == (small, checks)  # deterministic


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    pytest.importorskip("transformers")
    return boundary_model(tmp_path_factory.mktemp("boundary") / "llama")


def _fuzz(model, tmp_path, bug=None):
    return fuzz(f"hf:{model}", f"zoo:{model}", out=tmp_path,
                cand_options={"bug": bug} if bug else {})


@pytest.mark.parametrize("name", ["kv_block_off_by_one", "rope_cache_short", "positions_int8"])
def test_boundary_bug_is_found_shrunk_and_localized(model, tmp_path, name):
    bug = BOUNDARY_BUGS[name]
    result = _fuzz(model, tmp_path, name)
    assert not result and result.failing >= 1
    smallest = min(result.findings, key=lambda f: f.input.key)
    assert (len(smallest.input.tokens), smallest.input.steps) == (bug.prompt_length, bug.steps)
    assert smallest.failure.kind == "diverged" and smallest.failure.step == 0
    assert smallest.tensor is not None and smallest.tensor_step == 0  # localized
    assert smallest.diagnosis is not None
    # one size smaller passes: the input is minimal in length
    assert all(len(f.input.tokens) >= bug.prompt_length for f in result.findings)


def test_bug_free_zoo_has_no_failing_input(model, tmp_path):
    result = _fuzz(model, tmp_path)
    assert result and result.failing == 0 and result.tried == 64
    assert result.kl_limit < 1e-6  # float32 on both sides: a tight limit, and nothing over it
    assert [x.tokens for x, _ in result.rejected] == [()]  # both refuse an empty prompt


def test_empty_prompt_crash_is_a_finding_through_the_cli(model, tmp_path):
    out = tmp_path / "fuzz.json"
    proc = subprocess.run(
        [sys.executable, "-m", "lockstep.cli.main", "fuzz", f"hf:{model}", f"zoo:{model}",
         "--cand-opt", "bug=empty_prompt_crash", "--out", str(tmp_path / "dumps"),
         "--json", str(out), "--budget", "8"],
        capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 1, proc.stderr
    assert "Traceback" not in proc.stderr + proc.stdout
    assert "0 tokens, 1 step" in proc.stdout and "crash: RuntimeError" in proc.stdout
    report = json.loads(out.read_text())
    assert report["kind"] == "fuzz" and not report["ok"]
    (group,) = report["groups"]
    (finding,) = group["findings"]
    assert finding["kind"] == "crash" and finding["input"]["tokens"] == []


def test_only_failures_measured_as_amplified_precision_leave_the_result_clean():
    from lockstep.fuzz.result import Failure, Finding, FuzzResult

    x = FuzzInput((1, 27408), 1)
    split = Failure("diverged", step=0, kl=1.07, why="real split")
    drift = Finding(x, split, x, 3, verdict="drift", precision="every op within rounding",
                    shrunk_from=2)

    def result(findings, failing):
        return FuzzResult("hf:a", "llamacpp:a", 0, 64, SPACE, 0.05, tried=64, failing=failing,
                          rejected=(), findings=tuple(findings), checks=70, seconds=1.0)

    assert result([drift], failing=2)  # both failing inputs shrank to the measured one
    assert not result([drift], failing=3)  # one failing input was never shown to be precision
    real = Finding(x, split, x, 3, verdict="diverged")
    assert not result([drift, real], failing=3)
    assert result([drift], 2).to_json()["ok"] and result([drift], 2).to_json()["real_findings"] == 0


def test_a_failure_at_every_block_boundary_shrinks_to_the_first():
    """Fails at 17, 33, 49, ... positions (a block boundary crossed): 32 and 34 pass, yet a
    short input is still cut to the smallest length that fails."""
    def fails(x: FuzzInput) -> bool:
        return x.positions >= 17 and x.positions % 16 == 1

    small, _ = shrink(FuzzInput(tuple(range(1, 34)), 1), fails)
    assert len(small.tokens) == 17 and small.steps == 1


def test_a_long_length_only_failure_shrinks_in_a_few_checks():
    """Fails from 32769 positions on (an int16 position): each check would be a 32k-token
    prefill on both engines, so the shrinker must not spend its budget cutting."""
    def fails(x: FuzzInput) -> bool:
        return x.positions >= 32769

    small, checks = shrink(FuzzInput((5,) * 32768, 2), fails)
    assert small.positions == 32769 and small.steps == 1
    assert checks <= 6, checks
