"""The zoo's MoE family (issue: mixture-of-experts and LoRA adapters): routing bugs get the
``moe`` diagnosis with the figures a person acts on, a bfloat16 routing flip at a near-tie
drifts, NaN is named where it first is."""

from __future__ import annotations

import math

import numpy as np
import pytest

from lockstep.capture.recorder import record
from lockstep.cli.main import main
from lockstep.compare import compare
from lockstep.store.reader import open_dump
from lockstep.zoo.score import run_zoo

MOE_BUGS = ["moe_topk_not_normalized", "moe_softmax_after_topk", "moe_expert_offset",
            "moe_no_shared_expert", "moe_gate_up_swapped", "moe_capacity_drop",
            "moe_nan_expert_lora"]


@pytest.fixture(scope="module")
def moe_score(tmp_path_factory):
    root = tmp_path_factory.mktemp("moe")
    return root, run_zoo(root, families=("qwen3_moe", "qwen2_moe"), bugs=MOE_BUGS)


def _title(score, name):
    return next(r.title for r in score.results if r.bug.name == name)


def test_every_moe_bug_is_localized_with_its_diagnosis(moe_score):
    _, score = moe_score
    assert len(score.results) == 8  # the NaN adapter on both families
    for r in score.results:
        assert (r.step, r.tensor, r.diagnosis) == (r.bug.step, r.bug.tensor, r.bug.diagnosis), \
            (r.bug.name, r.family, r.title)


def test_moe_titles_say_what_routing_did(moe_score):
    _, score = moe_score
    offset = _title(score, "moe_expert_offset")
    assert "chose experts {" in offset and "instead of {" in offset
    assert "the expert ids are shifted by one" in offset and "router logits agree" in offset
    assert "are not renormalized" in _title(score, "moe_topk_not_normalized")
    assert "softmax after top-k" in _title(score, "moe_softmax_after_topk")
    assert "expert 3 differs" in _title(score, "moe_gate_up_swapped")
    assert "shared expert is left out" in _title(score, "moe_no_shared_expert")
    assert "the experts' sum differs at token" in _title(score, "moe_capacity_drop")


def test_nan_lora_on_an_expert_is_named_where_it_first_is(moe_score):
    _, score = moe_score
    for r in score.results:
        if r.bug.name == "moe_nan_expert_lora":
            assert "at layers.1.feed_forward.experts.5.w2" in r.title, r.title
            assert "recorded by the candidate only" in r.title


def test_bfloat16_router_flips_a_near_tie_and_drifts(moe_score):
    """The control is real: the bfloat16 run chose other experts for some token than float32
    transformers did, and that is drift, not a bug."""
    root, score = moe_score
    verdicts = {(c.family, c.dtype): c.verdict for c in score.controls}
    flipped = 0
    for family in ("qwen3_moe", "qwen2_moe"):
        assert verdicts[family, "bfloat16"] == "drift"
        assert verdicts[family, "float32"] == "match"
        ref, cand = (open_dump(root / family / f) for f in ("reference.lsd",
                                                           "control-bfloat16.lsd"))
        ids = {}
        for dump, side in ((ref, "ref"), (cand, "cand")):
            for rec in dump.records:
                if rec.name.endswith("gate:2"):
                    layer = rec.name.split(".")[-3]
                    ids[side, rec.step, layer] = np.sort(dump.read(rec), -1)
        flipped += sum(int((ids[k] != ids[("cand", *k[1:])]).any(-1).sum())
                       for k in ids if k[0] == "ref")
    assert flipped > 0


def _nan_lora_dumps(tmp_path):
    """A PEFT-style candidate whose o_proj's lora_B output is NaN (a record the reference does
    not have), so o_proj, the layer and the final hidden state are NaN too."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((1, 4, 8)).astype(np.float32)
    paths = []
    for side in ("ref", "cand"):
        path = tmp_path / f"{side}.lsd"
        with record(path, overwrite=True) as rec:
            rec.capture("input_ids", np.arange(4)[None], role="input")
            rec.capture("model.embed_tokens", x)
            rec.capture("model.layers.0.input_layernorm", x * 2)
            rec.capture("model.layers.0.self_attn.q_proj", x * 3)
            out = x * 4
            if side == "cand":
                rec.capture("model.layers.0.self_attn.o_proj.lora_A.default", x[..., :2])
                rec.capture("model.layers.0.self_attn.o_proj.lora_B.default",
                            np.full_like(x, np.nan))
                out = np.full_like(x, np.nan)
            rec.capture("model.layers.0.self_attn.o_proj", out)
            rec.capture("model.norm", out * 0.5)
        paths.append(path)
    return paths


def test_nan_lora_b_is_named_and_final_cosine_is_not_one(tmp_path, capsys):
    ref, cand = _nan_lora_dumps(tmp_path)
    c = compare(ref, cand)
    assert c.verdict == "diverged" and c.diagnosis is not None and c.diagnosis.kind == "nan"
    assert "at model.layers.0.self_attn.o_proj.lora_B.default" in c.diagnosis.title
    assert c.diagnosis.detail["first_nonfinite"] == \
        "model.layers.0.self_attn.o_proj.lora_B.default"
    final = next(p for p in c.results if p.ref_name == "model.norm")
    assert final.metrics is not None and math.isnan(final.metrics.cosine)
    main(["compare", str(ref), str(cand)])
    out = capsys.readouterr().out
    assert "cosine at least 1.0" not in out and "not finite" in out
