"""`lockstep.check_loaded` and `lockstep weights`: a live model against its checkpoint."""

from __future__ import annotations

import json
from collections import Counter

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

import lockstep
from lockstep.checkpoint import placement_map
from lockstep.cli.main import main
from test_against import hf_dir, trained, write_gguf

ENGINE = '''
from safetensors.torch import load_file

from lockstep.engines import Engine
from models import tiny


class Partial(Engine):
    """Loads the checkpoint into a fresh model, except layer 1 (a key-renaming bug)."""

    name = "partial"

    def load(self):
        self.model = tiny("llama", seed=7)
        state = load_file({ckpt!r})
        self.model.load_state_dict(
            {{k: v for k, v in state.items() if ".layers.1." not in k}}, strict=False)

    def tokenize(self, text):
        return []

    def generate(self, rec, prompt_ids, decode, *, forced=None):
        return []


class NoModel(Partial):
    def load(self):
        self.model = "a compiled graph"
'''


@pytest.fixture
def saved(tmp_path):
    model = trained()
    return model, hf_dir(model, tmp_path / "hf")


def _statuses(check) -> dict[str, str]:
    return {p.name: p.status for p in check.params}


def test_layer_not_loaded_is_named(saved):
    model, ref = saved
    check = lockstep.check_loaded(model, ref / "model.safetensors")
    assert check and not check.problems and check.not_loaded == []
    assert len(check.params) == 21 and {s.verdict for s in check.layers} == {"loaded"}

    torch.manual_seed(123)
    model.model.layers[1].apply(model._init_weights)  # what a missed key leaves behind
    check = lockstep.check_loaded(model, ref)
    assert not check and check.not_loaded == ["model.layers.1"]
    bad = {p.name: p for p in check.problems}
    assert set(bad) == {n for n in _statuses(check) if n.startswith("model.layers.1.")}
    assert len(bad) == 9 and {p.status for p in bad.values()} == {"fresh init"}
    assert "all ones" in bad["model.layers.1.input_layernorm.weight"].note
    assert {p.transform for p in bad.values()} == {""}  # no layout fits unrelated values
    q = bad["model.layers.1.self_attn.q_proj.weight"]
    assert "normal(0, 0.02)" in q.note and "uncorrelated" in q.note
    assert q.rel_l2 == pytest.approx(np.sqrt(2), abs=0.1)  # two independent draws
    layer = {s.layer: s for s in check.layers}["model.layers.1"]
    assert (layer.verdict, layer.counts) == ("not loaded", {"fresh init": 9})


def test_different_but_not_fresh(saved):
    model, ref = saved
    with torch.no_grad():
        model.model.layers[0].mlp.down_proj.weight.mul_(1.001)
        model.model.layers[0].self_attn.o_proj.weight.add_(1.0)
    check = lockstep.check_loaded(model, ref)
    bad = {p.name: p for p in check.problems}
    assert {n: p.status for n, p in bad.items()} == {
        "model.layers.0.mlp.down_proj.weight": "different",
        "model.layers.0.self_attn.o_proj.weight": "different"}
    down = bad["model.layers.0.mlp.down_proj.weight"]
    w = model.model.layers[0].mlp.down_proj.weight.detach()
    assert down.max_abs == pytest.approx(float((w - w / 1.001).abs().max()), rel=1e-3)
    assert {s.layer: s.verdict for s in check.layers}["model.layers.0"] == "differs"
    assert check.not_loaded == []
    # both are the checkpoint's values, changed: nothing says they are other values
    assert not any("uncorrelated" in p.note for p in bad.values())


def test_other_values_than_the_checkpoints_are_named_uncorrelated(saved):
    """A weight holding values of no known init's spread (an engine's own init, another
    tensor's values) is "different", with the note that it is not the checkpoint's values."""
    model, ref = saved
    with torch.no_grad():
        model.model.layers[1].mlp.up_proj.weight.normal_(0.0, 0.37)  # no default init's std
        model.model.layers[1].mlp.gate_proj.weight.mul_(-1.0)  # correlated: r = -1
    check = lockstep.check_loaded(model, ref)
    bad = {p.name: p for p in check.problems}
    up, gate = bad["model.layers.1.mlp.up_proj.weight"], bad["model.layers.1.mlp.gate_proj.weight"]
    assert up.status == "different" and "uncorrelated with the checkpoint (r=" in up.note
    assert "holds" not in up.note  # no checkpoint tensor has these values
    assert gate.status == "different" and "uncorrelated" not in gate.note
    # its values are not the checkpoint's: the layer is partly loaded, not merely "differs"
    assert up.other_values and not gate.other_values
    assert {s.layer: s.verdict for s in check.layers}["model.layers.1"] == "partly loaded"
    assert check.not_loaded == ["model.layers.1"]


def test_a_tensor_loaded_from_another_layer_is_named(saved):
    """A loader's wrong layer index: layer 1's up_proj holds layer 0's values. By its spread
    and no correlation it looks like a fresh init (this checkpoint is itself a fresh
    normal(0, 0.02) init), but its values are a checkpoint tensor's, exactly: the check says
    whose, and calls it different, not unloaded."""
    model, ref = saved
    with torch.no_grad():
        model.model.layers[1].mlp.up_proj.weight.copy_(model.model.layers[0].mlp.up_proj.weight)
    check = lockstep.check_loaded(model, ref)
    (bad,) = check.problems
    assert bad.name == "model.layers.1.mlp.up_proj.weight" and bad.status == "different"
    assert bad.note.startswith("holds model.layers.0.mlp.up_proj.weight's values: loaded from "
                               "the wrong tensor (uncorrelated with its own, r=")
    assert bad.values_of == "model.layers.0.mlp.up_proj.weight" and not bad.other_values
    assert check.not_loaded == []


def test_lower_precision_copy_is_equal(saved):
    model, ref = saved
    half = trained().to(torch.bfloat16)
    check = lockstep.check_loaded(half, ref)
    assert check, list(check.problems)[:2]
    with torch.no_grad():  # one bf16 step off is not the checkpoint rounded
        w = half.model.layers[1].mlp.up_proj.weight
        w.copy_(torch.nextafter(w, torch.full_like(w, 10.0)))
    assert _statuses(lockstep.check_loaded(half, ref))[
        "model.layers.1.mlp.up_proj.weight"] == "different"


def test_against_gguf_undoes_qk_rows(tmp_path):
    model = trained()
    path = write_gguf(tmp_path / "m.gguf", model, qtype="F32")
    check = lockstep.check_loaded(model, path)
    assert check, check.problems
    layout = {p.name: p.transform for p in check.params}
    assert layout["model.layers.1.self_attn.k_proj.weight"] == "rope_unpermute"
    assert layout["model.layers.1.self_attn.v_proj.weight"] == ""
    assert {p.checkpoint_name for p in check.params if p.name.startswith("model.layers.0.")
            } == {f"blk.0.{n}.weight" for n in ("attn_norm", "attn_q", "attn_k", "attn_v",
                                                 "attn_output", "ffn_norm", "ffn_gate",
                                                 "ffn_up", "ffn_down")}


def test_missing_on_either_side_and_tied_head(tmp_path, saved):
    model, ref = saved
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    del state["model.layers.0.mlp.up_proj.weight"], state["lm_head.weight"]
    state["model.layers.0.mlp.extra.weight"] = torch.ones(3)
    save_file(state, str(tmp_path / "odd.safetensors"))
    check = lockstep.check_loaded(model, tmp_path / "odd.safetensors")
    statuses = _statuses(check)
    assert statuses["model.layers.0.mlp.up_proj.weight"] == "missing from checkpoint"
    assert statuses["model.layers.0.mlp.extra.weight"] == "missing from model"
    # no lm_head in the checkpoint: the untied head is held against the embedding, and
    # being a draw of normal(0, 0.02) unrelated to it, looks never loaded
    assert statuses["lm_head.weight"] == "fresh init"
    assert Counter(statuses.values())["equal"] == 19
    assert {s.layer: s.verdict for s in check.layers}["model.layers.0"] == "differs"

    tied = trained(tie_word_embeddings=True)
    ref_tied = hf_dir(tied, tmp_path / "tied")
    check = lockstep.check_loaded(tied, ref_tied)
    assert check and "lm_head.weight" in _statuses(check)
    head = next(p for p in check.params if p.name == "lm_head.weight")
    assert head.checkpoint_name == "model.embed_tokens.weight" and "tied" in head.note
    untied = trained()  # its lm_head was never loaded from the tied checkpoint
    untied.load_state_dict({k: v for k, v in tied.state_dict().items()
                            if k != "lm_head.weight"}, strict=False)
    check = lockstep.check_loaded(untied, ref_tied)
    head = next(p for p in check.problems)
    assert (head.name, head.status) == ("lm_head.weight", "fresh init")


def test_placement_outliers(saved):
    model, ref = saved
    model.model.layers[0].to(torch.float64)
    model.lm_head.to("meta")
    placement = placement_map(model)
    assert (placement.device, placement.dtype) == ("cpu", "float32")
    outliers = {m.name: m.outlier for m in placement.outliers}
    assert set(outliers) == {f"model.layers.0.{n}" for n in (
        "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
        "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj", "input_layernorm",
        "post_attention_layernorm")} | {"lm_head"}
    assert outliers["lm_head"] == "device meta, not cpu"
    assert outliers["model.layers.0.mlp.up_proj"] == "dtype float64, not float32"
    rows = {(g["device"], g["dtype"]): g for g in placement.groups()}
    assert rows[("cpu", "float64")]["modules"] == 9
    assert rows[("meta", "float32")]["params"] == 160 * 64
    check = lockstep.check_loaded(model, ref)
    assert _statuses(check)["lm_head.weight"] == "not materialized"
    assert Counter(_statuses(check).values()) == {"equal": 20, "not materialized": 1}
    assert check.not_loaded == ["lm_head"]


def test_weights_cli(tmp_path, capsys, saved):
    model, ref = saved
    out = tmp_path / "w.json"
    assert main(["weights", f"hf:{ref}", str(ref), "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["passed"] and report["summary"]["equal"] == 21
    assert report["placement"]["outliers"] == []
    assert "PASS" in capsys.readouterr().out

    (tmp_path / "eng.py").write_text(ENGINE.format(ckpt=str(ref / "model.safetensors")))
    spec = f"py:{tmp_path / 'eng.py'}:Partial"
    assert main(["weights", spec, str(ref), "--json", str(out)]) == 1
    report = json.loads(out.read_text())
    assert report["not_loaded"] == ["model.layers.1"]
    assert {p["status"] for p in report["problems"]} == {"fresh init"}
    assert report["summary"]["fresh init"] == 9 and report["summary"]["equal"] == 12
    text = " ".join(capsys.readouterr().out.split())
    assert "FAIL 9 of 21 tensors not equal; not loaded: model.layers.1" in text

    # a layer left in float64 holds the right values, yet the command fails on placement
    (tmp_path / "eng64.py").write_text(ENGINE.format(ckpt=str(ref / "model.safetensors"))
                                       .replace('".layers.1." not in k', "True")
                                       .replace("strict=False)", "strict=False)\n        "
                                                "self.model.model.layers[1].double()"))
    assert main(["weights", f"py:{tmp_path / 'eng64.py'}:Partial", str(ref)]) == 1
    text = " ".join(capsys.readouterr().out.split())
    assert "9 modules placed apart from the rest" in text and "float64" in text


@pytest.mark.parametrize("case", ["no_torch_model", "bad_checkpoint", "bad_spec"])
def test_weights_user_errors(tmp_path, capsys, saved, case):
    _, ref = saved
    (tmp_path / "eng.py").write_text(ENGINE.format(ckpt=str(ref / "model.safetensors")))
    spec, ckpt = f"py:{tmp_path / 'eng.py'}:NoModel", str(ref)
    if case == "bad_checkpoint":
        spec, ckpt = f"hf:{ref}", str(tmp_path / "nothing.safetensors")
    elif case == "bad_spec":
        spec = "nonsense"
    capsys.readouterr()
    assert main(["weights", spec, ckpt]) == 2
    err = capsys.readouterr().err
    assert err.startswith("lockstep: error: ") and len(err.strip().splitlines()) == 1
    if case == "no_torch_model":
        assert "no torch model" in err and "str" in err


def _to_float8(linear, scale, *, name="weight_scale", transposed=False):
    """The linear's weight as an engine that quantizes when loading holds it (vLLM's
    ``--quantization fp8``): float8 values and the scale they are multiplied by."""
    w = linear.weight.detach()
    full = scale if scale.dim() < 2 or scale.shape == w.shape else torch.repeat_interleave(
        torch.repeat_interleave(scale, w.shape[0] // scale.shape[0], 0),
        w.shape[1] // scale.shape[1], 1)
    q = (w / full).to(torch.float8_e4m3fn)
    del linear.weight
    linear.weight = torch.nn.Parameter(q.t().contiguous() if transposed else q,
                                       requires_grad=False)
    setattr(linear, name, torch.nn.Parameter(scale.float(), requires_grad=False))
    linear.input_scale = torch.nn.Parameter(torch.tensor(1.0), requires_grad=False)


def test_float8_weights_with_their_scales_are_the_checkpoints(saved):
    """An engine that quantized the float32 checkpoint to float8 when loading holds q and a
    scale (w = q * scale): per tensor, per row, stored transposed (vLLM's CUTLASS layout), or
    per 32 x 32 block (DeepSeek's weight_scale_inv). Each is the checkpoint's weight rounded
    to float8 after the scale: equal; the scales are the engine's own, not checkpoint tensors
    missing. Before, every such weight was 'different' and each scale 'missing from
    checkpoint'. A weight off by 30% is still different."""
    model, ref = saved
    for layer in model.model.layers:
        attn, mlp = layer.self_attn, layer.mlp
        _to_float8(attn.q_proj, attn.q_proj.weight.detach().abs().max() / 448)
        _to_float8(attn.o_proj, attn.o_proj.weight.detach().abs().max() / 448, transposed=True)
        _to_float8(mlp.down_proj, mlp.down_proj.weight.detach().abs().amax(1, keepdim=True) / 448)
        blocks = mlp.gate_proj.weight.detach().reshape(3, 32, 2, 32).abs().amax((1, 3)) / 448
        _to_float8(mlp.gate_proj, blocks, name="weight_scale_inv")
    check = lockstep.check_loaded(model, ref)
    assert check, check.problems
    by_name = {p.name: p for p in check.params}
    assert not any("scale" in name for name in by_name)
    o = by_name["model.layers.1.self_attn.o_proj.weight"]
    assert (o.status, o.transform, o.dtype) == ("equal", "transpose", "float8_e4m3fn")
    assert o.note == "float8, times model.layers.1.self_attn.o_proj.weight_scale"
    assert by_name["model.layers.1.mlp.gate_proj.weight"].note.endswith("weight_scale_inv")
    with torch.no_grad():
        w = model.model.layers[1].mlp.down_proj.weight
        w.copy_((w.float() * 1.3).to(torch.float8_e4m3fn))
    (bad,) = lockstep.check_loaded(model, ref).problems
    assert bad.name == "model.layers.1.mlp.down_proj.weight" and bad.status == "different"
    assert 0.2 < bad.rel_l2 < 0.4  # measured on the values the weight stands for (q * scale)
