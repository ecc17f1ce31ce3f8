"""Fused weights pair with their parts: a vLLM-style model (tests/engines/nano_vllm.py, with
``qkv_proj`` and ``gate_up_proj``) against the transformers checkpoint it was built from, in
``lockstep weights`` and ``inspect --against``, with and without ``--mapping``."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import save_file

import lockstep
from engines.nano_vllm import LLM, SPEC
from models import save_tiny

TESTS = Path(__file__).parent

NANO = SPEC  # the engine as a user's py: engine


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("fused")
    return {family: save_tiny(family, root / family) for family in ("qwen3", "llama")}


def _cli(*args: Any) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, COLUMNS="200", PYTHONPATH=os.pathsep.join(
        [str(Path(lockstep.__file__).parents[1]), os.environ.get("PYTHONPATH", "")]))
    return subprocess.run([sys.executable, "-m", "lockstep.cli.main", *map(str, args)],
                          capture_output=True, text=True, env=env, timeout=300)


@pytest.mark.parametrize("family, params", [("qwen3", 19), ("llama", 15)])
def test_every_fused_weight_pairs(models, family, params):
    check = lockstep.check_loaded(LLM(models[family]).model, models[family])
    assert bool(check), check.problems
    assert len(check.params) == params  # no part left "missing from model"
    fused = {p.name: p for p in check.params if "qkv_proj" in p.name or "gate_up" in p.name}
    assert len(fused) == 4 and all(p.status == "equal" for p in fused.values())
    assert fused["model.layers.0.self_attn.qkv_proj.weight"].checkpoint_name == "+".join(
        f"model.layers.0.self_attn.{x}_proj.weight" for x in "qkv")


def test_wrong_rows_of_a_fused_weight_named(models):
    check = lockstep.check_loaded(LLM(models["qwen3"], bug="swapped_kv_rows").model,
                                  models["qwen3"])
    assert [p.name for p in check.problems] == [
        "model.layers.0.self_attn.qkv_proj.weight", "model.layers.1.self_attn.qkv_proj.weight"]
    note = check.problems[0].note
    assert "rows of model.layers.0.self_attn.k_proj.weight" in note
    assert "model.layers.0.self_attn.v_proj.weight (rel L2" in note
    assert note.endswith("; model.layers.0.self_attn.q_proj.weight equal")


def test_a_tensor_parallel_rank_of_fused_weights_holds_each_parts_shard(models):
    """vLLM's QKV and gate/up parallel layers hold, on rank r, rows r of each part (q, k,
    v; gate, up), stacked: each pairs as 'shard r of 2 (dim 0, each part)'. The stacked
    parts' first half of rows (a loader that shards the fused tensor as one) is no shard."""
    net = LLM(models["llama"]).model
    with torch.no_grad():
        for layer in net.model.layers:
            for module, parts in ((layer.self_attn.qkv_proj, (128, 64, 64)),
                                  (layer.mlp.gate_up_proj, (176, 176))):
                rows, start, pieces = module.weight, 0, []
                for n in parts:
                    pieces.append(rows[start + n // 2:start + n])  # rank 1 of 2
                    start += n
                module.weight = torch.nn.Parameter(torch.cat(pieces))
    check = lockstep.check_loaded(net, models["llama"])
    assert check, check.problems
    assert {p.transform for p in check.params if "qkv" in p.name or "gate_up" in p.name} == {
        "shard 1 of 2 (dim 0, each part)"}
    # 4 ranks, 2 KV heads: each rank holds one Q head and one KV head, KV head r // 2
    net = LLM(models["llama"]).model
    with torch.no_grad():
        for layer in net.model.layers:
            w = layer.self_attn.qkv_proj.weight
            q, k, v = w[:128], w[128:192], w[192:]
            layer.self_attn.qkv_proj.weight = torch.nn.Parameter(
                torch.cat([q[96:128], k[32:64], v[32:64]]))  # rank 3
            w = layer.mlp.gate_up_proj.weight
            layer.mlp.gate_up_proj.weight = torch.nn.Parameter(
                torch.cat([w[132:176], w[176 + 132:]]))
    check = lockstep.check_loaded(net, models["llama"])
    assert check, check.problems
    assert {p.transform for p in check.params if "qkv" in p.name} == {
        "shard 3 of 4 (dim 0, each part; the others' 1 of 2: KV heads held by 2 ranks)"}
    assert {p.transform for p in check.params if "gate_up" in p.name} == {
        "shard 3 of 4 (dim 0, each part)"}
    with torch.no_grad():  # layer 0's qkv: the first half of the stacked rows
        qkv = net.model.layers[0].self_attn.qkv_proj
        full = LLM(models["llama"]).model.model.layers[0].self_attn.qkv_proj.weight
        qkv.weight = torch.nn.Parameter(full[:128].clone())
    (bad,) = lockstep.check_loaded(net, models["llama"]).problems
    assert bad.name == "model.layers.0.self_attn.qkv_proj.weight" and bad.status == "different"


def test_a_float8_fused_weight_with_a_scale_per_part(models):
    """A float8 qkv_proj with one scale per part (q, k, v), as a loader that quantized each
    checkpoint tensor on its own holds it: each part's rows are that part over its scale."""
    net = LLM(models["llama"]).model
    with torch.no_grad():
        for layer in net.model.layers:
            qkv = layer.self_attn.qkv_proj
            w, parts = qkv.weight.detach(), (128, 64, 64)
            scale = torch.stack([piece.abs().max() / 448 for piece in w.split(parts)])
            q = (w / scale.repeat_interleave(torch.tensor(parts))[:, None]).to(
                torch.float8_e4m3fn)
            del qkv.weight
            qkv.weight = torch.nn.Parameter(q, requires_grad=False)
            qkv.weight_scale = torch.nn.Parameter(scale, requires_grad=False)
    check = lockstep.check_loaded(net, models["llama"])
    assert check, check.problems
    assert {p.note for p in check.params if "qkv" in p.name} == {
        f"float8, times model.layers.{i}.self_attn.qkv_proj.weight_scale" for i in (0, 1)}


def test_a_layer_the_engine_never_loaded_is_said_not_loaded(models):
    """The engine's loader skips layer 1: its tensors keep the engine's own init, whose
    spread is no default init's. Each is uncorrelated with the checkpoint and no other
    tensor's values, so the layer is "not loaded" (it was "differs")."""
    check = lockstep.check_loaded(LLM(models["llama"], bug="layer_not_loaded").model,
                                  models["llama"])
    bad = list(check.problems)
    assert bad and all(p.layer == "model.layers.1" and p.other_values for p in bad)
    assert any(p.status == "different" for p in bad)  # not all caught by an init's spread
    assert {s.layer: s.verdict for s in check.layers}["model.layers.1"] == "not loaded"
    assert check.not_loaded == ["model.layers.1"]


def test_weights_command(tmp_path, models):
    """The nano-vLLM engine as a user's py: engine, its model directory given with --opt: its
    module tree comes from torch_module() (it has no .model)."""
    model = models["qwen3"]
    done = _cli("weights", NANO, model, "--opt", f"model={model}", "--json", tmp_path / "w.json")
    assert done.returncode == 0, done.stdout + done.stderr
    assert "PASS  all 19 tensors equal" in done.stdout
    report = json.loads((tmp_path / "w.json").read_text())
    assert report["summary"]["missing from model"] == 0
    assert report["summary"]["missing from checkpoint"] == 0

    done = _cli("weights", NANO, model, "--opt", f"model={model}", "--opt", "bug=swapped_kv_rows")
    assert done.returncode == 1, done.stdout + done.stderr
    text = " ".join(done.stdout.split())
    assert "FAIL 2 of 19 tensors not equal" in text
    assert "model.layers.0.self_attn.qkv_proj.weight" in text
    assert "rows of model.layers.0.self_attn.k_proj.weight" in text

    # an option the engine needs and was not given is the user's to fix: one line, exit 2
    done = _cli("weights", NANO, model)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert "needs the option 'model'" in done.stderr and "internal error" not in done.stderr
    # and diff says so before it records the reference, not after
    done = _cli("diff", f"hf:{model}", NANO, "--tokens", "1,2", "--out", tmp_path / "d")
    assert done.returncode == 2 and "needs the option 'model'" in done.stderr
    assert not (tmp_path / "d" / "reference.lsd").exists()


def _vllm_checkpoint(model: Path, out: Path, bug: str | None = None,
                     rename: Any = lambda n: n, extra: dict | None = None) -> Path:
    """The nano-vLLM model's own state dict saved as a checkpoint: fused names."""
    state = {**LLM(model, bug=bug).model.state_dict(), **(extra or {})}
    out.mkdir()
    save_file({rename(k): v.contiguous() for k, v in state.items()
               if k != "lm_head.weight" or "lm_head.weight" in _names(model)},
              str(out / "model.safetensors"))
    return out


def _names(model: Path) -> set[str]:
    from safetensors import safe_open

    with safe_open(str(model / "model.safetensors"), "np") as f:
        return set(f.keys())


@pytest.mark.parametrize("family", ["qwen3", "llama"])
def test_inspect_against_pairs_fused_tensors(tmp_path, models, family):
    vllm = _vllm_checkpoint(models[family], tmp_path / "vllm")
    done = _cli("inspect", vllm, "--against", models[family], "--json", tmp_path / "a.json")
    assert done.returncode == 0, done.stdout + done.stderr
    report = json.loads((tmp_path / "a.json").read_text())
    statuses = {t["key"]: t["status"] for t in report["pairs"]}
    assert set(statuses.values()) == {"ok"}, statuses
    assert statuses["layers.1.gate_up.weight"] == "ok"
    # the other way round: the parts on A's side stacked to meet B's fused tensor
    done = _cli("inspect", models[family], "--against", vllm)
    assert done.returncode == 0, done.stdout + done.stderr

    bad = _vllm_checkpoint(models[family], tmp_path / "bad", bug="swapped_kv_rows")
    done = _cli("inspect", bad, "--against", models[family], "--json", tmp_path / "b.json")
    assert done.returncode == 1, done.stdout + done.stderr
    report = json.loads((tmp_path / "b.json").read_text())
    wrong = sorted(t["key"] for t in report["pairs"] if t["status"] != "ok")
    assert wrong == ["layers.0.qkv.weight", "layers.1.qkv.weight"]


MAPPING = """\
ignore = ["trunk.*.scratch"]
"""


def test_mapping_for_weights(tmp_path, models):
    def own(name: str) -> str:  # an engine's own names: trunk.N.<what>
        return name.replace("model.layers.", "trunk.").replace("self_attn.", "").replace(
            "mlp.", "")

    ckpt = _vllm_checkpoint(models["llama"], tmp_path / "own", rename=own,
                            extra={"trunk.0.scratch": torch.zeros(4)})
    done = _cli("inspect", ckpt, "--against", models["llama"])
    assert done.returncode == 1  # without the mapping: nothing of the layers pairs
    rules = MAPPING + "".join(f"""
[[rule]]
cand = 'trunk\\.(\\d+)\\.{op}\\.weight'
ref = "model.layers.{{1}}.{where}{op}.weight"
""" for op, where in (("qkv_proj", "self_attn."), ("o_proj", "self_attn."),
                      ("gate_up_proj", "mlp."), ("down_proj", "mlp."),
                      ("input_layernorm", ""), ("post_attention_layernorm", "")))
    (tmp_path / "map.toml").write_text(rules)
    done = _cli("inspect", ckpt, "--against", models["llama"], "--mapping",
                tmp_path / "map.toml", "--json", tmp_path / "m.json")
    assert done.returncode == 0, done.stdout + done.stderr
    report = json.loads((tmp_path / "m.json").read_text())
    assert {t["status"] for t in report["pairs"]} == {"ok"}

    (tmp_path / "t.toml").write_text(rules + 'transform = "transpose"\n')
    done = _cli("inspect", ckpt, "--against", models["llama"], "--mapping", tmp_path / "t.toml")
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert "transform in a mapping for weights" in done.stderr


@pytest.mark.parametrize("command", ["weights", "inspect", "generate"])
def test_a_bad_mapping_file_is_one_line(tmp_path, models, command):
    (tmp_path / "bad.toml").write_text("[[rule]]\ncand = '('\nref = 'x'\n")
    spec = f"hf:{models['llama']}"
    args = {"weights": [spec, models["llama"]],
            "inspect": [models["llama"], "--against", models["llama"]],
            "generate": [spec, spec, "--tokens", "1,2"]}[command]
    done = _cli(command, *args, "--mapping", tmp_path / "bad.toml")
    assert done.returncode == 2, done.stdout + done.stderr
    assert done.stderr.startswith("lockstep: error:") and "Traceback" not in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1
