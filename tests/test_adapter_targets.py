"""A LoRA adapter by the module it adapts (seed 003's table) and ``inspect ADAPTER --base
MODEL``: target_modules checked against the base model's module names."""

from __future__ import annotations

import json
import subprocess
import sys

import gguf
import numpy as np
from safetensors.numpy import save_file

from lockstep.cli.main import main

LAYERS = 27  # DeepSeek-V2-Lite: 27 layers, layer 0 a dense MLP (first_k_dense_replace 1)
ATTENTION = ("q_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj")  # q_lora_rank null
MLP = ("gate_proj", "up_proj", "down_proj")
EXPERTS = 2  # 64 routed experts in the real model; two show the layout
#: seed 003's PEFT config, as its "abnormal" debug output prints it
TARGETS = ["q_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj", "gate_proj", "up_proj",
           "down_proj"]


def _deepseek_v2_adapter(directory, targets=TARGETS):
    """Seed 003's adapter file, DeepSeek-V2-Lite-shaped: NaN in every attention, dense-MLP and
    shared-expert LoRA tensor, the routed experts' LoRA finite.

    The seed's table (shared_experts 312, self_attn 216, dense_mlp 6, routed_experts 0) does
    not print the file's tensor names, so the layout is derived from its counts:
    self_attn 216 = 27 layers x 4 MLA projections x (A, B); dense_mlp 6 = layer 0 x 3 x 2.
    The shared experts are one MLP per MoE layer (transformers and DeepSeek's
    modeling_deepseek.py build n_shared_experts=2 as one MLP of 2 x moe_intermediate_size),
    so one LoRA pair per projection gives 26 x 3 x 2 = 156, half the seed's 312. The seed's
    one source of a second copy is its BUG-009: KTransformers' MOELayerWrapper kept
    ``original_moe``, so each MoE layer's shared experts were reachable under two module
    paths, and a state_dict (what PEFT saves) lists a module once per path: 26 x 3 x 2 x 2 =
    312. The second path's name (``mlp.original_moe.shared_experts``) is our reading, not
    shown by the seed."""
    tensors = {}
    pre = "base_model.model.model.layers"
    nan = np.full((2, 4), np.nan, np.float32)
    ok = np.ones((2, 4), np.float32)
    for layer in range(LAYERS):
        modules = [(f"self_attn.{m}", True) for m in ATTENTION]
        if layer == 0:
            modules += [(f"mlp.{m}", True) for m in MLP]
        else:
            modules += [(f"mlp.{path}shared_experts.{m}", True)
                        for path in ("", "original_moe.") for m in MLP]
            modules += [(f"mlp.experts.{e}.{m}", False) for e in range(EXPERTS) for m in MLP]
        for module, bad in modules:
            for ab in ("lora_A", "lora_B"):
                tensors[f"{pre}.{layer}.{module}.{ab}.weight"] = nan if bad else ok
    directory.mkdir(exist_ok=True)
    save_file(tensors, str(directory / "adapter_model.safetensors"))
    (directory / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "r": 8, "lora_alpha": 16, "target_modules": targets}))
    return directory


def _deepseek_v2_base(path):
    """The base model's tensor names (values tiny): what --base reads."""
    w = np.zeros((2, 2), np.float32)
    names = ["model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"]
    for layer in range(LAYERS):
        pre = f"model.layers.{layer}"
        names += [f"{pre}.input_layernorm.weight", f"{pre}.post_attention_layernorm.weight",
                  f"{pre}.self_attn.kv_a_layernorm.weight"]
        names += [f"{pre}.self_attn.{m}.weight" for m in ATTENTION]
        if layer == 0:
            names += [f"{pre}.mlp.{m}.weight" for m in MLP]
        else:
            names += [f"{pre}.mlp.gate.weight"]
            names += [f"{pre}.mlp.shared_experts.{m}.weight" for m in MLP]
            names += [f"{pre}.mlp.experts.{e}.{m}.weight" for e in range(EXPERTS) for m in MLP]
    save_file(dict.fromkeys(names, w), str(path))
    return path


def test_seed_003_table_comes_out_without_group_rules(tmp_path):
    adapter = _deepseek_v2_adapter(tmp_path / "adapter")
    out = tmp_path / "report.json"
    assert main(["inspect", str(adapter), "--json", str(out)]) == 1
    rows = json.loads(out.read_text())["components"]
    bad: dict[str, int] = {}
    for row in rows:
        bad[row["component"]] = bad.get(row["component"], 0) + row["bad_tensors"]
    assert bad == {"shared experts": 312, "attention": 216, "mlp": 6, "routed experts": 0}
    assert {row["adapter"] for row in rows} == {"lora A", "lora B"}


def test_base_finds_the_second_path_and_unnamed_modules(tmp_path, capsys):
    base = _deepseek_v2_base(tmp_path / "model.safetensors")
    # seed 003's fix rewrote target_modules to attention only, the file kept its MLP LoRA;
    # q_a_proj is DeepSeek-V2's (q_lora_rank 1536), not the Lite's
    adapter = _deepseek_v2_adapter(tmp_path / "adapter", targets=[
        "kv_a_proj_with_mqa", "o_proj", "q_proj", "kv_b_proj", "q_a_proj"])
    out = tmp_path / "report.json"
    assert main(["inspect", str(adapter), "--base", str(base), "--json", str(out)]) == 1
    check = json.loads(out.read_text())["target_modules"]
    assert check["unmatched_targets"] == ["q_a_proj"]
    assert check["absent_modules"] == [
        {"modules": f"model.layers.*.mlp.original_moe.shared_experts.{m}", "count": 26}
        for m in sorted(MLP)]
    unnamed = {g["modules"]: g["count"] for g in check["unnamed_modules"]}
    assert unnamed == {**{f"model.layers.*.mlp.{m}": 1 for m in MLP},
                       **{f"model.layers.*.mlp.shared_experts.{m}": 26 for m in MLP},
                       **{f"model.layers.*.mlp.original_moe.shared_experts.{m}": 26
                          for m in MLP},
                       **{f"model.layers.*.mlp.experts.*.{m}": 26 * EXPERTS for m in MLP}}
    assert check["adapted_modules"] == 27 * 4 + 3 + 26 * 3 * (2 + EXPERTS)
    text = capsys.readouterr().out
    assert "targets that match no module of the base: q_a_proj" in text
    assert "model.layers.*.mlp.original_moe.shared_experts.up_proj (26)" in text

    # the seed's full config names every adapted module; only the second path is left
    _deepseek_v2_adapter(adapter)
    assert main(["inspect", str(adapter), "--base", str(base), "--json", str(out)]) == 1
    check = json.loads(out.read_text())["target_modules"]
    assert check["unmatched_targets"] == [] and check["unnamed_modules"] == []
    assert len(check["absent_modules"]) == 3


def test_base_as_gguf_and_a_regex_target(tmp_path, capsys):
    """A GGUF base's names read as transformers' (blk.1.attn_q is model.layers.1...q_proj)."""
    base = tmp_path / "base.gguf"
    writer = gguf.GGUFWriter(str(base), "llama")
    w = np.zeros((4, 4), np.float32)
    for name in ("token_embd", "output_norm", "output", *(
            f"blk.{i}.{t}" for i in range(2) for t in ("attn_q", "attn_k", "attn_v",
                                                       "attn_output", "ffn_up"))):
        writer.add_tensor(f"{name}.weight", w)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    save_file({f"base_model.model.model.layers.{i}.self_attn.{m}.lora_{ab}.weight": w
               for i in range(2) for m in ("q_proj", "v_proj") for ab in "AB"},
              str(adapter / "adapter_model.safetensors"))
    config = {"peft_type": "LORA", "target_modules": r".*\.(q_proj|v_proj)"}
    (adapter / "adapter_config.json").write_text(json.dumps(config))
    assert main(["inspect", str(adapter), "--base", str(base)]) == 0
    text = capsys.readouterr().out
    assert "4 modules adapted" in text and "every target matches a base module" in text
    config["target_modules"] = r".*\.q_proj"  # v_proj's LoRA is then not named
    (adapter / "adapter_config.json").write_text(json.dumps(config))
    assert main(["inspect", str(adapter), "--base", str(base)]) == 1
    assert "model.layers.*.self_attn.v_proj (2)" in capsys.readouterr().out


def test_base_errors_are_one_line(tmp_path, capsys):
    base = _deepseek_v2_base(tmp_path / "model.safetensors")
    adapter = _deepseek_v2_adapter(tmp_path / "adapter")
    r = subprocess.run([sys.executable, "-m", "lockstep.cli.main", "inspect", str(base),
                        "--base", str(base)], capture_output=True, text=True)
    assert r.returncode == 2 and r.stderr.strip() == (
        f"lockstep: error: --base checks a PEFT adapter's target_modules, and {base} is a "
        "safetensors checkpoint, not an adapter directory")
    config = json.loads((adapter / "adapter_config.json").read_text())
    cases = [
        ([str(adapter), "--base", str(adapter)], None, "is an adapter; give the base model"),
        ([str(adapter), "--base", str(tmp_path / "missing")], None, "missing"),
        ([str(adapter), "--base", str(base), "--against", str(base)], None,
         "two different checks"),
        ([str(adapter), "--base", str(base)], "[bad", "is not a regular expression"),
        ([str(adapter), "--base", str(base)], None, "target_modules is not a list"),
    ]
    for args, targets, message in cases:
        (adapter / "adapter_config.json").write_text(json.dumps({**config, **(
            {"target_modules": targets} if "target_modules" in message or targets else {})}))
        assert main(["inspect", *args]) == 2, message
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("lockstep: error: ") and message in err[0]
