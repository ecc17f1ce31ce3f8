"""``lockstep fuzz`` on batch inputs: the batches it generates, their shrinking, each of the
zoo's batch bugs found, shrunk and diagnosed with the sequences named; the bug-free zoo and a
candidate that cannot batch give no failing batch input."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from lockstep.fuzz import BatchInput, FuzzInput, Space, fuzz
from lockstep.fuzz.batch import shrink_batch
from lockstep.fuzz.inputs import generate
from lockstep.zoo.batch_bugs import BATCH_BUGS
from lockstep.zoo.boundary_bugs import boundary_model

pytestmark = pytest.mark.usefixtures("one_thread")

SPACE = Space(vocab=320, context=512, block=16, max_length=512, special={"bos": 1, "eos": 2})
#: the tests' fuzz runs cap lengths here: every batch input, short (the full default runs are
#: commands in docs/fuzz.md)
SHORT = 32


def test_batches_mix_lengths_both_sides_and_a_join_after_the_boundary_inputs():
    a, b = generate(SPACE, 64, 0), generate(SPACE, 64, 0)
    assert a == b  # the seed makes the batches too
    batches = [x for x in a if isinstance(x, BatchInput)]
    where = [i for i, x in enumerate(a) if isinstance(x, BatchInput)]
    assert where == list(range(where[0], where[0] + len(batches)))  # together
    assert all(x.why != "random" for x in a[:where[0]])  # after every boundary input
    assert a[where[-1] + 1].why == "random"
    lengths = {tuple(len(s) for s in x.sequences) for x in batches}
    assert (1, 17, 129) in lengths and (15, 16, 17) in lengths and (1, 511) in lengths
    assert {x.padding for x in batches} == {"left", "right"}
    joins = [x for x in batches if x.join_at is not None]
    assert {x.padding for x in joins} == {"left", "right"}
    assert all(x.steps > x.join_at for x in joins)  # the others still decode when it joins
    assert all(len(s) + x.steps - 1 <= 512 for x in batches for s in x.sequences)


def test_batch_shrinking_drops_sequences_then_shrinks_each():
    def fails(x: FuzzInput | BatchInput) -> bool:  # two sequences of different lengths
        return isinstance(x, BatchInput) and len({len(s) for s in x.sequences}) > 1

    start = BatchInput(((5, 6, 7), tuple(range(1, 20)), (9,) * 40), 3, "left")
    small, checks = shrink_batch(start, fails)
    assert isinstance(small, BatchInput) and small.steps == 1
    assert sorted(len(s) for s in small.sequences) == [1, 2]
    assert all(t == 0 for s in small.sequences for t in s)
    assert shrink_batch(start, fails) == (small, checks)  # deterministic

    def alone(x: FuzzInput | BatchInput) -> bool:  # sequence (5, 6, 7) fails by itself
        seqs = x.sequences if isinstance(x, BatchInput) else (x.tokens,)
        return any(len(s) >= 3 and 7 in s for s in seqs)

    single, _ = shrink_batch(start, alone)
    assert isinstance(single, FuzzInput) and sorted(single.tokens) == [0, 0, 7]  # single


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    pytest.importorskip("transformers")
    return boundary_model(tmp_path_factory.mktemp("boundary") / "llama")


@pytest.mark.parametrize("name", sorted(BATCH_BUGS))
def test_batch_bug_is_found_shrunk_and_names_the_sequences(model, tmp_path, name):
    bug = BATCH_BUGS[name]
    result = fuzz(f"hf:{model}", f"zoo:{model}", out=tmp_path, max_length=SHORT,
                  cand_options={"bug": name})
    assert not result and not result.skipped
    batches = [f for f in result.findings if isinstance(f.input, BatchInput)]
    assert batches and len(batches) == len(result.findings)  # no single-sequence failure
    named = [f for f in batches if f.diagnosis == bug.diagnosis]
    assert named, [(f.diagnosis, f.title) for f in batches]
    f = min(named, key=lambda f: f.input.key)
    assert isinstance(f.input, BatchInput) and isinstance(f.found_from, BatchInput)
    assert len(f.input.sequences) == 2 and f.input.key < f.found_from.key  # shrunk
    assert all(len(s) <= 3 for s in f.input.sequences)
    assert sorted(f.named) == [0, 1] and f.sequence in f.named
    assert f.failure.sequence is not None and f.tensor is not None
    if bug.join_at is not None:  # only a request joining mid-decode shows it
        assert f.input.join_at is not None and f.input.steps > f.input.join_at


def test_bug_free_zoo_has_no_failing_batch_input(model, tmp_path):
    result = fuzz(f"hf:{model}", f"zoo:{model}", out=tmp_path, max_length=SHORT)
    batches = [x for x in generate(result.space, 64, 0) if isinstance(x, BatchInput)]
    assert {(x.padding, x.join_at is not None) for x in batches} == {
        ("left", False), ("right", False), ("left", True), ("right", True)}
    assert result and result.failing == 0 and not result.skipped


def test_a_candidate_that_cannot_batch_skips_the_batches_through_the_cli(model, tmp_path):
    out = tmp_path / "fuzz.json"
    proc = subprocess.run(
        [sys.executable, "-m", "lockstep.cli.main", "fuzz", f"hf:{model}", f"hf:{model}",
         "--max-length", "16", "--out", str(tmp_path / "dumps"), "--json", str(out)],
        capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr + proc.stdout
    words = " ".join(proc.stdout.split())  # the lines wrap where the temporary path's length
    assert "batch input(s) skipped" in words and "cannot run a batch" in words  # puts them
    report = json.loads(out.read_text())
    assert report["ok"] and len(report["skipped"]) == 8
    assert all("cannot run a batch" in s["reason"] for s in report["skipped"])
    assert {s["input"]["padding"] for s in report["skipped"]} == {"left", "right"}
