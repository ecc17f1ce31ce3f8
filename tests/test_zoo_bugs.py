"""The zoo as lockstep's accuracy benchmark: every bug localized and diagnosed, every
bug-free control left undiverged (issue: the bug zoo)."""

from __future__ import annotations

import pytest

from lockstep.cli.main import main
from lockstep.zoo.bugs import BUGS
from lockstep.zoo.config import ZOO_FAMILIES as FAMILIES
from lockstep.zoo.score import run_zoo


@pytest.fixture(scope="module")
def score(tmp_path_factory):
    return run_zoo(tmp_path_factory.mktemp("zoo"))


RUNS = [(bug.name, family) for bug in BUGS.values() for family in bug.families]


@pytest.mark.parametrize("name,family", RUNS, ids=[f"{b}-{f}" for b, f in RUNS])
def test_bug_is_localized_and_diagnosed(score, name, family):
    r = next(r for r in score.results if (r.bug.name, r.family) == (name, family))
    assert (r.step, r.tensor) == (r.bug.step, r.bug.tensor), r.title
    assert r.diagnosis == r.bug.diagnosis, r.title
    assert r.title


def test_the_score_counts_every_run(score):
    assert score.passed == len(score.results) == len(RUNS) == 65


def test_no_negative_control_diverges(score):
    assert {(c.family, c.dtype) for c in score.controls} == {
        (f, d) for f in FAMILIES for d in ("float32", "float64", "bfloat16")}
    verdicts = {(c.family, c.dtype): c.verdict for c in score.controls}
    for family in FAMILIES:  # float32 against float32 matches, bfloat16 drifts
        assert verdicts[(family, "float32")] == verdicts[(family, "float64")] == "match"
        assert verdicts[(family, "bfloat16")] == "drift"
    assert all(c.ok for c in score.controls)
    assert bool(score)


CONDITIONAL = [(b.name, f) for b in BUGS.values() if b.condition for f in b.families]


@pytest.mark.parametrize("name,family", CONDITIONAL, ids=[f"{b}-{f}" for b, f in CONDITIONAL])
def test_a_run_outside_the_condition_does_not_diverge(score, name, family):
    r = next(r for r in score.results if (r.bug.name, r.family) == (name, family))
    assert r.outside in ("match", "drift"), r.outside


def test_every_family_has_a_bug_from_a_public_thread():
    public = {f for b in BUGS.values() if b.source.startswith("https://github.com/")
              for f in b.families}
    assert public >= set(FAMILIES) - {"qwen3"}
    threads = [b for b in BUGS.values() if b.source.startswith("https://github.com/")]
    assert len(threads) == 32


def test_seed_001_reads_like_the_story_ended(score):
    """The fused decode VM's QK-norm over 16-element blocks: layer 0's QK-norm, the first
    step the blocked code computes (decode step 1), the normalisation extent named."""
    r = next(r for r in score.results if r.bug.name == "blocked_qk_norm")
    assert (r.step, r.tensor, r.diagnosis) == (1, "layers.0.q_norm", "blocked_norm")
    assert "16-element blocks instead of the head's 64 elements" in r.title


def test_decode_bugs_name_their_cause(score):
    titles = {r.bug.name: r.title for r in score.results if r.family == "llama"}
    assert "was fed token" in titles["wrong_decode_token"]
    assert "+1 position" in titles["wrong_decode_position"]
    assert "KV cache" in titles["wrong_kv_slot"]
    assert "positions as token ids" in titles["swapped_args"]


def test_zoo_command_scores_and_rejects_unknown_bugs(tmp_path, capsys):
    assert main(["zoo", "--family", "llama", "--bug", "stale_hidden",
                 "--out", str(tmp_path)]) == 0
    assert "1 of 1 bugs localized" in capsys.readouterr().out
    assert main(["zoo", "--bug", "no_such_bug"]) == 2
    assert "unknown zoo bug 'no_such_bug'" in capsys.readouterr().err
