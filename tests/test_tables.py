"""Name tables against real tiny models of each architecture, built from their config class."""

from __future__ import annotations

import re
from typing import Any

import numpy as np
import pytest
import torch

import lockstep
from lockstep.align import tables
from lockstep.align.pairing import align
from lockstep.align.tables import (
    LLAMA_CPP,
    LLAMA_REFERENCE,
    TRANSFORMERS_GEMMA,
    TRANSFORMERS_GPT2,
    TRANSFORMERS_LLAMA,
    TRANSFORMERS_PHI3,
    NameTable,
    detect_table,
)
from lockstep.align.transforms import apply_transform
from models import PROMPT

transformers = pytest.importorskip("transformers")
from lockstep.engines.hf import DERIVED_INPUTS  # noqa: E402
from lockstep.engines.hf_rope import watch_rope  # noqa: E402

#: module inputs recorded as tensors of their own: the transformers engine's, and the
#: residual sum before the MLP where Gemma and GPT-2 name it differently
INPUTS = (*DERIVED_INPUTS, "*.down_proj", "*.pre_feedforward_layernorm", "*.ln_2", "*.c_proj")
COMMON = dict(vocab_size=160, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
MOE = dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32)
T, H, KV, D = len(PROMPT), 4, 2, 16

_ATTN = {"attn_norm", "q", "k", "v", "q_rope", "k_rope", "attn_probs", "attn_heads",
         "attn_out", "out"}
_LLAMA = _ATTN | {"attn_residual", "mlp_norm", "gate", "gate_act", "up", "act", "down",
                  "mlp_out"}
_ROUTED = _ATTN | {"attn_residual", "mlp_norm", "router", "expert_weights", "expert_ids",
                   "experts.gate_act", "experts_out", "mlp_out"}
_SHARED = {f"shared_expert.{op}" for op in ("gate", "gate_act", "up", "act", "down", "out")}
_GEMMA = _LLAMA | {"attn_post_norm", "mlp_post_norm"}
_QK_NORM = {"q_norm", "k_norm"}
_TOP = {"input_ids", "embed", "rope_cos", "rope_sin", "final_norm", "logits"}

#: family -> (config class, model class, config extras, table, per-layer ops)
FAMILIES: dict[str, tuple[str, str, dict[str, Any], NameTable, set[str]]] = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", {}, TRANSFORMERS_LLAMA, _LLAMA),
    "mistral": ("MistralConfig", "MistralForCausalLM", {}, TRANSFORMERS_LLAMA, _LLAMA),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", {}, TRANSFORMERS_LLAMA, _LLAMA),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", {"head_dim": D}, TRANSFORMERS_LLAMA,
              _LLAMA | _QK_NORM),
    "qwen3_moe": ("Qwen3MoeConfig", "Qwen3MoeForCausalLM", {"head_dim": D, **MOE},
                  TRANSFORMERS_LLAMA, _ROUTED | _QK_NORM),
    "qwen2_moe": ("Qwen2MoeConfig", "Qwen2MoeForCausalLM",
                  {**MOE, "shared_expert_intermediate_size": 48}, TRANSFORMERS_LLAMA,
                  _ROUTED | _SHARED | {"shared_expert_gate"}),
    "mixtral": ("MixtralConfig", "MixtralForCausalLM",
                {"num_local_experts": 4, "num_experts_per_tok": 2}, TRANSFORMERS_LLAMA,
                _ROUTED),
    "gemma2": ("Gemma2Config", "Gemma2ForCausalLM", {"head_dim": D}, TRANSFORMERS_GEMMA,
               _GEMMA),
    "gemma3": ("Gemma3TextConfig", "Gemma3ForCausalLM", {"head_dim": D}, TRANSFORMERS_GEMMA,
               _GEMMA | _QK_NORM),
    "phi3": ("Phi3Config", "Phi3ForCausalLM", {"pad_token_id": 0}, TRANSFORMERS_PHI3,
             _ATTN - {"q", "k", "v"} | {"qkv", "attn_residual", "mlp_norm", "gate_up",
                                        "gate_act", "act", "down", "mlp_out"}),
    "gpt2": ("GPT2Config", "GPT2LMHeadModel", {}, TRANSFORMERS_GPT2,
             {"attn_norm", "qkv", "attn_probs", "attn_heads", "attn_out", "attn_residual",
              "mlp_norm", "up", "act", "down", "mlp_out", "out"}),
}


def build(family: str) -> Any:
    config_name, model_name, extra, _, _ = FAMILIES[family]
    config_cls = getattr(transformers, config_name, None)
    model_cls = getattr(transformers, model_name, None)
    if config_cls is None or model_cls is None:
        pytest.skip(f"transformers {transformers.__version__} has no {model_name}")
    torch.manual_seed(0)
    if family == "gpt2":
        config = config_cls(vocab_size=160, n_embd=64, n_layer=2, n_head=H, n_positions=128)
    else:
        config = config_cls(**COMMON, **extra)
    config._attn_implementation = "eager"  # the attention probabilities are an output
    return model_cls(config).eval()


def record(model: Any, path: Any, include: list[str] | None = None) -> None:
    """One forward on the prompt, recorded as the transformers engine records it."""
    ids = torch.tensor([PROMPT])
    meta = {"architecture": type(model).__name__, "n_heads": H, "n_kv_heads": KV,
            "head_dim": D}
    with lockstep.record(path, meta=meta, include=include) as rec, torch.no_grad(), \
            watch_rope(rec, model):
        rec.watch(model, inputs=INPUTS)
        lockstep.probe("input_ids", ids)
        model(ids)


def layer_ops(canonical: str) -> tuple[int, str] | None:
    m = re.fullmatch(r"layers\.(\d+)\.(.+)", canonical)
    return (int(m.group(1)), re.sub(r"^experts\.\d+\.", "experts.E.", m.group(2))) if m else None


@pytest.mark.parametrize("family", list(FAMILIES))
def test_every_record_of_a_real_tiny_model_has_a_canonical_name(family, tmp_path):
    _, model_name, _, table, expected_ops = FAMILIES[family]
    record(build(family), tmp_path / "d")
    with lockstep.open_dump(tmp_path / "d") as dump:
        names = [r.name for r in dump.records]
        assert detect_table(names) is table
        assert detect_table(names, {"architecture": model_name}) is table
        unknown = [n for n in names if table.lookup_rule(n) is None]
        assert unknown == []
        per_layer: dict[int, set[str]] = {}
        top = set()
        seen: dict[str, str] = {}
        for r in dump.records:
            canonical, transform, _ = table.lookup_rule(r.name)
            if not table.is_alias(r.name):
                assert seen.setdefault(canonical, r.name) == r.name, "two records, one name"
            found = layer_ops(canonical)
            if found is None:
                top.add(canonical)
            else:
                per_layer.setdefault(found[0], set()).add(found[1])
            if canonical.endswith(("_norm", "_rope")) and canonical.split(".")[-1][0] in "qk":
                heads = H if canonical.split(".")[-1][0] == "q" else KV
                arr = apply_transform(transform, dump.read(r), dump.meta)
                assert arr.squeeze(0).shape == (T, heads, D), (r.name, arr.shape)
    assert sorted(per_layer) == [0, 1]
    assert per_layer[0] == per_layer[1] == expected_ops
    if family == "gpt2":
        assert top == {"input_ids", "tok_embed", "pos_embed", "embed", "final_norm", "logits"}
    else:
        assert top == _TOP


def test_the_runs_architecture_breaks_a_tie_when_pairing(tmp_path):
    """A real Gemma 3 dump recording only the Q/K projections, norms and RoPE: the Llama and the
    Gemma tables know every name, but only the Gemma table brings the q/k norms'
    (batch, heads, tokens, head_dim) into the canonical layout. The dump's metadata names
    the architecture, and pairing takes the Gemma table from it."""
    record(build("gemma3"), tmp_path / "d",
           include=[f"*.self_attn.{op}" for op in ("q_proj", "k_proj", "q_norm", "k_norm", "rope")])
    with lockstep.open_dump(tmp_path / "d") as dump:
        names = [r.name for r in dump.records]
        assert dump.meta["architecture"] == "Gemma3ForCausalLM"
        assert detect_table(names) is TRANSFORMERS_LLAMA  # a tie: the first table
        assert detect_table(names, dump.meta) is TRANSFORMERS_GEMMA
        alignment = align(dump, dump)
    assert alignment.tables == (TRANSFORMERS_GEMMA.name, TRANSFORMERS_GEMMA.name)
    assert {p.canonical for p in alignment.pairs} == {
        f"layers.{n}.{op}" for n in (0, 1)
        for op in ("q", "k", "q_norm", "k_norm", "q_rope", "k_rope")}  # RoPE: watch_rope's
    # (the selection applies to watch_rope's records too: "*.self_attn.rope" is included)


def test_the_architecture_never_outweighs_names():
    """An engine written after vLLM reports the transformers class of its model: its own
    table, knowing more of its names, is taken over the one made for that class."""
    names = [f"model.layers.{n}.{op}" for n in (0, 1) for op in (
        "input_layernorm:0", "input_layernorm:1", "self_attn.qkv_proj:0", "self_attn.q_norm",
        "self_attn.rotary_emb:0", "self_attn.attn", "self_attn.o_proj:0", "mlp.act_fn")]
    assert detect_table(names, {"architecture": "LlamaForCausalLM"}) is tables.VLLM


def test_tables_know_their_names():
    assert TRANSFORMERS_LLAMA.lookup("model.layers.7.mlp.down_proj:input.0") == (
        "layers.7.act", None)
    assert TRANSFORMERS_LLAMA.lookup_rule("model.layers.2.self_attn.rope:1") == (
        "layers.2.k_rope", "transpose(-3, -2)", None)
    assert TRANSFORMERS_LLAMA.lookup("model.layers.3.mlp.experts.5.down_proj") == (
        "layers.3.experts.5.down", None)
    assert TRANSFORMERS_LLAMA.lookup("model.layers.3.block_sparse_moe.experts.5.w1") == (
        "layers.3.experts.5.gate", None)
    assert TRANSFORMERS_GEMMA.lookup("model.layers.0.post_attention_layernorm") == (
        "layers.0.attn_post_norm", None)
    assert TRANSFORMERS_LLAMA.lookup("model.layers.0.post_attention_layernorm") == (
        "layers.0.mlp_norm", None)
    assert LLAMA_CPP.lookup_rule("Qcur-12:rope") == ("layers.12.q_rope", "rope_interleaved",
                                                     None)
    assert LLAMA_CPP.lookup("Kcur-0:rope") == ("layers.0.k_rope", "rope_interleaved")
    assert LLAMA_CPP.lookup("Qcur-0:reshape") is None
    assert TRANSFORMERS_GPT2.is_alias("transformer.h.0.attn.resid_dropout")
    assert not TRANSFORMERS_GPT2.is_alias("transformer.h.0.attn.c_proj")
    assert TRANSFORMERS_LLAMA.lookup_all("model.layers.1") == [("layers.1.out", None, None)]
    assert detect_table(["attn_norm-0", "Qcur-0", "l_out-0", "result_output"]) is LLAMA_CPP
    assert detect_table(["foo", "bar"]) is None
    assert tables.TABLES[0] is TRANSFORMERS_LLAMA


#: every name the zoo engine (Meta's reference code names) records, for layer 3
REFERENCE_NAMES = {
    "input_ids": "input_ids", "tok_embeddings": "embed", "norm": "final_norm",
    "output": "logits", "layers.3.attention_norm": "layers.3.attn_norm",
    "layers.3.attention.wq": "layers.3.q", "layers.3.attention.wk": "layers.3.k",
    "layers.3.attention.wv": "layers.3.v", "layers.3.attention.q_norm": "layers.3.q_norm",
    "layers.3.attention.k_norm": "layers.3.k_norm",
    "layers.3.attention.rope:0": "layers.3.q_rope",
    "layers.3.attention.rope:1": "layers.3.k_rope",
    "layers.3.attention.wo:input.0": "layers.3.attn_heads",
    "layers.3.attention.wo": "layers.3.attn_out",
    "layers.3.ffn_norm:input.0": "layers.3.attn_residual",
    "layers.3.ffn_norm": "layers.3.mlp_norm", "layers.3.feed_forward.w1": "layers.3.gate",
    "layers.3.feed_forward.w3": "layers.3.up", "layers.3.feed_forward.w2:input.0":
    "layers.3.act", "layers.3.feed_forward.w2": "layers.3.down", "layers.3": "layers.3.out",
}


def test_llama_reference_names():
    for name, canonical in REFERENCE_NAMES.items():
        assert LLAMA_REFERENCE.lookup_rule(name) == (canonical, None, None), name
    assert LLAMA_REFERENCE.lookup_rule("layers.3.attention.k_norm.block12") == (
        "layers.3.k_norm", None, "block(16, 12)")
    assert detect_table(REFERENCE_NAMES) is LLAMA_REFERENCE


def _as_reference(name: str) -> str | None:
    """The zoo's name for a transformers Qwen3 record (None: the zoo has no such record)."""
    hit = TRANSFORMERS_LLAMA.lookup_rule(name)
    if hit is None or TRANSFORMERS_LLAMA.is_alias(name):
        return None
    layer = re.match(r"layers\.(\d+)(?=\.|$)", hit[0])
    for zoo, canonical in REFERENCE_NAMES.items():
        if layer is None and canonical == hit[0]:
            return zoo
        if layer and canonical == re.sub(r"^layers\.\d+", "layers.3", hit[0]):
            return re.sub(r"^layers\.3", f"layers.{layer.group(1)}", zoo)
    return None


def test_reference_names_and_blocks_pair_with_transformers(tmp_path):
    """Qwen3's records renamed as the zoo names them (q/k after RoPE in its (batch, tokens,
    heads, head_dim) layout, q/k norms also in 16-element blocks) pair through the tables."""
    model = build("qwen3")
    record(model, tmp_path / "ref")
    with lockstep.open_dump(tmp_path / "ref") as ref, \
            lockstep.record(tmp_path / "cand", meta=dict(ref.meta)):
        for r in ref:
            zoo = _as_reference(r.name)
            if zoo is None:
                continue
            # token ids stay integers (an int record never pairs with a float one)
            arr = np.array(ref.raw(r) if r.dtype.startswith("int") else ref.read(r))
            if zoo.endswith(("rope:0", "rope:1")):
                arr = arr.swapaxes(-3, -2)
            lockstep.probe(zoo, arr)
            if zoo.endswith(("q_norm", "k_norm")):
                for b in (0, 5):
                    lockstep.probe(f"{zoo}.block{b}", arr.reshape(-1)[16 * b:16 * (b + 1)])
    result = lockstep.compare(tmp_path / "ref", tmp_path / "cand")
    assert result.verdict == "match"
    by_cand = {p.cand_name: p for p in result.results}
    assert by_cand["layers.1.attention.q_norm.block5"].ref_name == \
        "model.layers.1.self_attn.q_norm"
    assert by_cand["layers.1.attention.q_norm.block5"].error == 0.0
    assert by_cand["layers.0.attention.rope:1"].canonical == "layers.0.k_rope"
    assert {p.how for p in result.results} == {"name", "table"}
    assert len([p for p in result.results if p.how == "table"]) == 2 * (17 + 4) + 3


def test_llama_cpp_q_and_k_after_rope_pair(tmp_path):
    """llama.cpp's ``Qcur-N:rope`` is (tokens, heads, head_dim) in GGUF's row order."""
    model = build("llama")
    record(model, tmp_path / "ref")
    with lockstep.open_dump(tmp_path / "ref") as ref, \
            lockstep.record(tmp_path / "cand", meta={"head_dim": D, "n_head": H}):
        for r in ref:
            m = re.fullmatch(r"model\.layers\.(\d+)\.self_attn\.rope:([01])", r.name)
            if m:
                arr = np.array(ref.read(r))[0].swapaxes(0, 1)  # (tokens, heads, head_dim)
                gguf = np.swapaxes(arr.reshape(*arr.shape[:-1], 2, D // 2), -1, -2)
                lockstep.probe(f"{'QK'[int(m.group(2))]}cur-{m.group(1)}:rope",
                               gguf.reshape(1, *arr.shape))
    result = lockstep.compare(tmp_path / "ref", tmp_path / "cand")
    pairs = {p.canonical: p for p in result.results}
    assert set(pairs) == {f"layers.{i}.{qk}_rope" for i in (0, 1) for qk in "qk"}
    assert all(p.error == 0.0 for p in pairs.values())
