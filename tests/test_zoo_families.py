"""The zoo's families beyond Llama and Qwen3 (issue 22): the family-specific diagnoses name
their constant, and ``lockstep zoo --family`` runs one family."""

from __future__ import annotations

import pytest

from lockstep.cli.main import main
from lockstep.zoo.score import run_zoo

BUGS = ("attn_softcap_missing", "window_all_layers", "embed_scale_twice",
        "query_pre_attn_scalar_ignored", "window_off_by_one", "window_decode_off_by_one",
        "yarn_mscale_squared", "llama3_rope_ignored")


@pytest.fixture(scope="module")
def titles(tmp_path_factory):
    score = run_zoo(tmp_path_factory.mktemp("families"),
                    families=("gemma2", "mistral", "qwen3-yarn", "llama3"), bugs=BUGS,
                    controls=False)
    return {r.bug.name: r.title for r in score.results}


def test_the_softcap_is_named_with_its_value(titles):
    assert "capped at 1 on one side only" in titles["attn_softcap_missing"]


def test_the_window_bugs_say_which_keys(titles):
    assert "keys beyond the window are attended" in titles["window_off_by_one"]
    assert "see 9 keys where the reference's window is 8" in titles["window_decode_off_by_one"]
    assert "a global layer" in titles["window_all_layers"]


def test_the_constant_factors_are_named(titles):
    assert "constant factor 11.31 = √hidden (√128)" in titles["embed_scale_twice"]
    assert "1/√24, query_pre_attn_scalar" in titles["query_pre_attn_scalar_ignored"]
    assert "constant factor 1.208" in titles["yarn_mscale_squared"]  # 0.1 ln 8 + 1


def test_rope_scaling_left_out_is_not_read_as_another_base(titles):
    assert ("plain frequencies of base 5e+05 where the reference's are rescaled"
            in titles["llama3_rope_ignored"])


def test_zoo_runs_one_family(tmp_path, capsys):
    assert main(["zoo", "--family", "qwen2", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "2 of 2 bugs localized" in out and "families: qwen2" in out
    assert "qwen2 float32: match" in out
    with pytest.raises(SystemExit) as exit_:  # argparse: a one-line usage error
        main(["zoo", "--family", "gemma4"])
    assert exit_.value.code == 2
    assert "invalid choice: 'gemma4'" in capsys.readouterr().err
