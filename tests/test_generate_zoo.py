"""The generation check on the zoo's decode-time bugs: a decode-only divergence at the right
step with its first divergent tensor, and a transposed lm_head flagged as garbage.

The zoo runs SmolLM2-135M's real weights here: a tiny random model's next-token
distributions are nearly flat, so a bug barely moves them at the token level."""

from __future__ import annotations

import pytest

from lockstep.generation import check_generation
from lockstep.zoo.bugs import BUGS

PROMPT = "The capital of France is"


@pytest.fixture(scope="module")
def model():
    from lockstep.demo import find_smollm2
    from lockstep.engines.hf import gguf_as_safetensors

    try:
        return gguf_as_safetensors(find_smollm2())
    except Exception as exc:  # the demo model is an install-time dependency
        pytest.skip(f"SmolLM2 is not available: {exc}")


def _check(model, tmp_path, bug, tokens=4):
    return check_generation(f"hf:{model}", f"zoo:{model}", [PROMPT], max_new_tokens=tokens,
                            out=tmp_path, cand_options={"bug": bug})


@pytest.mark.parametrize("bug", ["wrong_decode_position", "wrong_kv_slot", "wrong_decode_token"])
def test_decode_bugs_are_decode_only_divergences(model, tmp_path, bug):
    result = _check(model, tmp_path, bug).prompts[0]
    assert result.diverged_step == 1
    comparison = result.localization.comparison
    first = comparison.first_divergence
    assert (first.step, first.canonical) == (BUGS[bug].step, BUGS[bug].tensor)
    assert comparison.diagnosis.kind == "decode"
    if bug != "wrong_decode_token":  # the tokens agree: the decode check is what saw it
        assert result.decode_check.broken and result.split_step is None
    assert all(p.error <= p.tol for p in comparison.results if p.step == 0)


def test_transposed_lm_head_is_garbage_diagnosed_at_the_logits(model, tmp_path):
    result = _check(model, tmp_path, "lm_head_layout", tokens=16).prompts[0]
    assert [f.kind for f in result.garbage] == ["repetition"]
    comparison = result.localization.comparison
    assert comparison.first_divergence.canonical == "logits"
    assert comparison.diagnosis.kind == "logits"


def test_bug_free_zoo_generates_like_transformers(model, tmp_path):
    result = _check(model, tmp_path, None).prompts[0]
    assert result.diverged_step is None and not result.garbage
    assert result.localization is None
