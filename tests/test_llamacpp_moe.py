"""llama.cpp running a MoE model: a tiny Qwen2-MoE (routed experts and a shared expert)
written by this test as transformers' checkpoint and as a GGUF through ``gguf``, recorded by
both engines; llama.cpp's MoE records (ffn_moe_*, the shared expert's ffn_*/ffn_shexp*) pair
through the name table with transformers' router, experts and shared expert."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from lockstep.align.tables import LLAMA_CPP, LLAMA_CPP_QWEN_MOE
from lockstep.cli.main import main
from lockstep.compare import compare

pytest.importorskip("llama_cpp")
torch = pytest.importorskip("torch")
gguf = pytest.importorskip("gguf")

PROMPT = "1,17,42,7,99"
#: transformers' module names -> GGUF tensor names, per layer (llama.cpp's qwen2moe)
TO_GGUF = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
           "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
           "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
           "mlp.gate": "ffn_gate_inp", "mlp.shared_expert.gate_proj": "ffn_gate_shexp",
           "mlp.shared_expert.up_proj": "ffn_up_shexp",
           "mlp.shared_expert.down_proj": "ffn_down_shexp",
           "mlp.shared_expert_gate": "ffn_gate_inp_shexp"}


def _tiny_qwen2_moe(directory: Path):
    """2 layers, both sparse (llama.cpp's qwen2moe has no dense layers): 8 experts, top 3,
    weights not renormalized, a shared expert; a router with spread-out logits."""
    from transformers import Qwen2MoeConfig, Qwen2MoeForCausalLM

    torch.manual_seed(0)
    model = Qwen2MoeForCausalLM(Qwen2MoeConfig(
        vocab_size=320, hidden_size=64, intermediate_size=96, moe_intermediate_size=32,
        num_experts=8, num_experts_per_tok=3, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=128, rope_theta=1e6,
        shared_expert_intermediate_size=48, norm_topk_prob=False))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("mlp.gate.weight"):
                param.normal_(0, 0.5)
    model.save_pretrained(directory)
    return model


def _write_gguf(model, path: Path) -> Path:
    """The GGUF llama.cpp's converter would write (F32; Qwen's NEOX RoPE needs no Q/K
    permutation); transformers' fused gate_up experts split into ffn_gate_exps/ffn_up_exps."""
    c = model.config
    state = {k: v.detach().float().numpy() for k, v in model.state_dict().items()}
    w = gguf.GGUFWriter(str(path), "qwen2moe")
    w.add_context_length(128)
    w.add_embedding_length(c.hidden_size)
    w.add_block_count(c.num_hidden_layers)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(c.num_attention_heads)
    w.add_head_count_kv(c.num_key_value_heads)
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    w.add_rope_freq_base(1e6)
    w.add_expert_count(c.num_experts)
    w.add_expert_used_count(c.num_experts_per_tok)
    w.add_expert_feed_forward_length(c.moe_intermediate_size)
    w.add_expert_shared_feed_forward_length(c.shared_expert_intermediate_size)
    w.add_tokenizer_model("llama")  # a stand-in vocabulary: the test feeds token ids
    tokens = ["<unk>", "<s>", "</s>"] + [f"t{i}" for i in range(3, c.vocab_size)]
    w.add_token_list(tokens)
    w.add_token_scores([0.0] * len(tokens))
    w.add_token_types([2, 3, 3] + [1] * (len(tokens) - 3))
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    out = {"token_embd.weight": state["model.embed_tokens.weight"],
           "output_norm.weight": state["model.norm.weight"],
           "output.weight": state["lm_head.weight"]}
    for i in range(c.num_hidden_layers):
        pre = f"model.layers.{i}."
        for own, name in TO_GGUF.items():
            for part in ("weight", "bias"):
                if pre + own + "." + part in state:
                    arr = state[pre + own + "." + part]
                    out[f"blk.{i}.{name}.{part}"] = arr.reshape(-1) if name.endswith(
                        "_shexp") and "inp" in name else arr
        gate_up = state[pre + "mlp.experts.gate_up_proj"]  # (experts, 2 * ff, hidden)
        half = gate_up.shape[1] // 2
        out[f"blk.{i}.ffn_gate_exps.weight"] = gate_up[:, :half]
        out[f"blk.{i}.ffn_up_exps.weight"] = gate_up[:, half:]
        out[f"blk.{i}.ffn_down_exps.weight"] = state[pre + "mlp.experts.down_proj"]
    for name, arr in out.items():
        w.add_tensor(name, np.ascontiguousarray(arr, dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def test_llama_cpp_moe_records_pair_with_transformers(tmp_path):
    model = _tiny_qwen2_moe(tmp_path / "hf")
    gguf_file = _write_gguf(model, tmp_path / "qwen2moe.gguf")
    for spec, out, extra in ((f"hf:{tmp_path / 'hf'}", "ref", []),
                             # ffn_moe_topk is a view of ffn_moe_argsort: views=true records it
                             (f"llamacpp:{gguf_file}", "cand", ["--opt", "views=true"])):
        assert main(["capture", spec, "--tokens", PROMPT, "--decode", "1",
                     "--out", str(tmp_path / out), *extra]) == 0
    c = compare(tmp_path / "ref", tmp_path / "cand")
    assert c.verdict == "drift"  # F16 KV cache in llama.cpp: drift, no divergence
    pairs = {(p.ref_name, p.cand_name): p for p in c.results if p.step == 0}
    for layer in (0, 1):
        hf = f"model.layers.{layer}.mlp"
        expected = {
            f"{hf}.gate:0": "ffn_moe_logits", f"{hf}.gate:1": "ffn_moe_weights",
            f"{hf}.gate:2": "ffn_moe_topk", f"{hf}.experts": "ffn_moe_out",
            f"{hf}.shared_expert.gate_proj": "ffn_gate", f"{hf}.shared_expert.up_proj": "ffn_up",
            f"{hf}.shared_expert.down_proj:input.0": "ffn_swiglu",
            f"{hf}.shared_expert": "ffn_shexp", f"{hf}.shared_expert_gate": "ffn_shexp_gate_inp",
            hf: "ffn_out"}
        for ref_name, cand in expected.items():
            pair = pairs.get((ref_name, f"{cand}-{layer}"))
            assert pair is not None, (ref_name, cand)
            assert pair.how == "table", (ref_name, pair.how)
            assert pair.metrics is not None and pair.metrics.rel_l2 < 1e-3, ref_name
    # the same experts chosen, in the same order
    ids = pairs[("model.layers.1.mlp.gate:2", "ffn_moe_topk-1")]
    assert ids.metrics.rel_l2 == 0
    # no llama.cpp record pairs with attention's output by accident (its wo output is
    # unnamed in the qwen2moe graph; the shared expert's 5-value sigmoid gate once did)
    assert not any(p.cand_name.startswith("ffn_shexp_gate-") for p in c.results)


def test_moe_names_in_the_tables():
    """The names llama.cpp gives its MoE activations, in the llama graph (Mixtral GGUFs) and
    the Qwen MoE graphs (which also name the shared expert)."""
    for table in (LLAMA_CPP, LLAMA_CPP_QWEN_MOE):
        assert table.lookup("ffn_moe_logits-2") == ("layers.2.router", None)
        assert table.lookup("ffn_moe_topk-0") == ("layers.0.expert_ids", None)
        assert table.lookup("ffn_moe_weights_norm-1") == ("layers.1.expert_weights", None)
        assert table.is_alias("ffn_moe_weights-1")
        assert table.lookup("ffn_moe_out-0") == ("layers.0.experts_out", None)
    assert LLAMA_CPP.lookup("Qcur-0") == ("layers.0.q", "rope_interleaved")
    assert LLAMA_CPP_QWEN_MOE.lookup("Qcur-0") == ("layers.0.q", None)  # NEOX RoPE
    assert LLAMA_CPP.lookup("ffn_gate-1") == ("layers.1.gate", None)
    assert LLAMA_CPP_QWEN_MOE.lookup("ffn_gate-1") == ("layers.1.shared_expert.gate", None)
    assert LLAMA_CPP_QWEN_MOE.lookup("ffn_shexp-3") == ("layers.3.shared_expert.out", None)
    assert LLAMA_CPP_QWEN_MOE.lookup("ffn_out-3") == ("layers.3.mlp_out", None)


def test_weights_of_fused_experts_pair_with_each_experts_tensors(tmp_path):
    """transformers 5 holds a MoE layer's experts fused, ``experts.gate_up_proj`` [E, 2I, H]
    and ``experts.down_proj`` [E, H, I] (parameters with no ``.weight``), where its own
    checkpoint holds each expert's ``gate_proj``/``up_proj``/``down_proj``: ``weights`` of
    the model against that checkpoint said 4 fused tensors missing from the checkpoint and
    every expert's missing from the model. Each pairs with the experts' tensors stacked
    (against the GGUF: ffn_gate_exps and ffn_up_exps joined expert by expert), the router
    and the shared expert with llama.cpp's names, and vLLM's w13_weight/w2_weight too; a
    changed expert is named."""
    from safetensors.numpy import save_file

    import lockstep
    from lockstep.checkpoint.against import against_checkpoints

    model = _tiny_qwen2_moe(tmp_path / "hf")
    gguf_file = _write_gguf(model, tmp_path / "qwen2moe.gguf")
    hf = "model.layers.1.mlp.experts.{}.{}_proj.weight"
    for checkpoint, gate_up, down in (
            (tmp_path / "hf", f"{hf.format(0, 'gate')} ... {hf.format(7, 'up')} (8 experts)",
             f"{hf.format(0, 'down')} ... {hf.format(7, 'down')} (8 experts)"),
            (gguf_file, "blk.1.ffn_gate_exps.weight+blk.1.ffn_up_exps.weight",
             "blk.1.ffn_down_exps.weight")):
        check = lockstep.check_loaded(model, checkpoint)
        assert check, check.problems
        names = {p.name: p.checkpoint_name for p in check.params}
        assert names["model.layers.1.mlp.experts.gate_up_proj"] == gate_up
        assert names["model.layers.1.mlp.experts.down_proj"] == down
        assert not any(p.status.startswith("missing") for p in check.params)
    assert against_checkpoints(gguf_file, tmp_path / "hf")

    # vLLM's and SGLang's FusedMoE names for the same tensors
    state = {k: v.detach().numpy() for k, v in model.state_dict().items()}
    vllm = {k.replace("experts.gate_up_proj", "experts.w13_weight")
             .replace("experts.down_proj", "experts.w2_weight"): v for k, v in state.items()}
    save_file(vllm, str(tmp_path / "vllm.safetensors"))
    report = against_checkpoints(tmp_path / "vllm.safetensors", tmp_path / "hf")
    assert report, [p for p in report.pairs if not p.ok]

    # rank 1 of 2 of vLLM's FusedMoE under tensor parallelism: each expert's rows 16-31 of
    # gate and of up ([8, 32, 64]), and its down_proj's columns 16-31
    ranked = _tiny_qwen2_moe(tmp_path / "again")
    with torch.no_grad():
        for layer in ranked.model.layers:
            experts = layer.mlp.experts
            w = experts.gate_up_proj
            experts.gate_up_proj = torch.nn.Parameter(torch.cat([w[:, 16:32], w[:, 48:]], 1))
            experts.down_proj = torch.nn.Parameter(experts.down_proj[:, :, 16:].clone())
    check = lockstep.check_loaded(ranked, gguf_file)
    assert check, check.problems
    layout = {p.name: p.transform for p in check.params}
    assert layout["model.layers.0.mlp.experts.gate_up_proj"] == "shard 1 of 2 (dim 1, each part)"
    assert layout["model.layers.0.mlp.experts.down_proj"] == "shard 1 of 2 (dim 2)"

    with torch.no_grad():
        model.model.layers[1].mlp.experts.gate_up_proj[5] *= 1.01
    (bad,) = lockstep.check_loaded(model, gguf_file).problems
    assert bad.name == "model.layers.1.mlp.experts.gate_up_proj" and bad.status == "different"
    assert bad.note == "experts 5 (rel L2 0.01) of 8 differ; 7 equal"
