"""The verdict on tiny real transformers models: match, drift, diverged, and where."""

from __future__ import annotations

import pytest
import torch

import lockstep
from models import greedy, tiny, variant

FAMILIES = ["llama", "qwen3"]


@pytest.mark.parametrize("family", FAMILIES)
def test_float64_copy_matches(tmp_path, family):
    model = tiny(family)
    greedy(model, tmp_path / "ref")
    greedy(variant(model, torch.float64), tmp_path / "cand")
    result = lockstep.compare(tmp_path / "ref", tmp_path / "cand")
    assert result.verdict == "match"
    assert result.first_divergence is None
    assert bool(result)
    assert len(result.results) > 30 and not result.ref_only and not result.cand_only
    assert max(p.error for p in result.results) < 1e-5


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("proj", ["gate_proj", "up_proj", "down_proj"])
def test_changed_weight_in_layer1_mlp_diverges_there(tmp_path, family, proj):
    model = tiny(family)
    greedy(variant(model, torch.float64), tmp_path / "ref")
    bad = variant(model)
    with torch.no_grad():
        getattr(bad.model.layers[1].mlp, proj).weight[5, 3] += 1.0
    greedy(bad, tmp_path / "cand")
    result = lockstep.compare(tmp_path / "ref", tmp_path / "cand")
    assert result.verdict == "diverged"
    assert not result
    first = result.first_divergence
    assert (first.step, first.ref_name) == (0, f"model.layers.1.mlp.{proj}")
    assert first.inherited < 1e-5 < first.error


@pytest.mark.parametrize("family", FAMILIES)
def test_decode_position_off_by_one_diverges_at_step_1(tmp_path, family):
    model = tiny(family)
    tokens = greedy(model, tmp_path / "ref")
    greedy(variant(model), tmp_path / "cand", position_shift=1, forced=tokens)
    result = lockstep.compare(tmp_path / "ref", tmp_path / "cand")
    assert result.verdict == "diverged"
    first = result.first_divergence
    assert first.step == 1
    assert first.ref_name.startswith("model.rotary_emb")
    # prefill is untouched
    assert all(p.error == 0.0 for p in result.results if p.step == 0)


@pytest.mark.parametrize("family", FAMILIES)
def test_bfloat16_run_drifts(tmp_path, family):
    model = tiny(family)
    tokens = greedy(model, tmp_path / "ref")
    greedy(variant(model, torch.bfloat16), tmp_path / "cand", forced=tokens)
    result = lockstep.compare(tmp_path / "ref", tmp_path / "cand")
    assert result.verdict == "drift"
    assert result.first_divergence is None
    assert max(p.error for p in result.results) > 1e-3  # really is bf16, not a copy


def test_steps_follow_top_level_calls(tmp_path):
    model = tiny("llama")
    greedy(model, tmp_path / "d", decode=2)
    with lockstep.open_dump(tmp_path / "d") as dump:
        assert dump.steps == [0, 1, 2]
        names = [r.name for r in dump.in_step(0)]
        assert names[0] == "model.embed_tokens"
        assert ":logits" in names and "lm_head" in names
        assert names.index("model.layers.1.mlp.gate_proj") < names.index("model.layers.1.mlp")
        assert dump.get(0, "model.embed_tokens").shape == (1, 7, 64)
        assert dump.get(1, "model.embed_tokens").shape == (1, 1, 64)
        assert dump.complete
