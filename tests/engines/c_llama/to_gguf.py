"""Write a Hugging Face llama model directory (config.json + model.safetensors) as a GGUF v3
file with F32 tensors, laid out the way llama.cpp's converter lays out a llama: GGUF tensor
names, dims innermost first, and the rows of the q and k projections permuted per head so
that RoPE on adjacent pairs (x[2i], x[2i+1]) is right.

``--quantize`` stores the weight matrices the way SmolLM2's Q4_1 GGUF does: token_embd as
Q8_0, the other matrices as Q4_1 (gguf.quants), a matrix whose rows are not whole 32-weight
blocks and every norm as F32. ``--dequantized`` writes the same values back as F32 (each
quantized matrix through gguf.quants.dequantize): the file an engine that dequantizes at load
time must run exactly like.

    python to_gguf.py MODEL_DIR OUT.gguf [--alignment N] [--quantize | --dequantized]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
from gguf import GGMLQuantizationType, GGUFWriter
from gguf.quants import dequantize, quantize
from safetensors.numpy import load_file


def permute_rows(weight: np.ndarray, n_head: int) -> np.ndarray:
    """The per-head row order llama.cpp's converter gives q_proj and k_proj: within each
    head of ``d`` rows, the row ``i`` of the first half and the row ``i`` of the second half
    become the neighbours ``2i`` and ``2i + 1``."""
    rows = weight.shape[0]
    half = rows // n_head // 2
    split = weight.reshape(n_head, 2, half, *weight.shape[1:])
    return np.ascontiguousarray(np.swapaxes(split, 1, 2).reshape(weight.shape))


def rope_theta(cfg: dict) -> float:
    params = cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}
    return float(params.get("rope_theta", cfg.get("rope_theta", 10000.0)))


def quant_type(name: str, array: np.ndarray) -> GGMLQuantizationType | None:
    """The type --quantize stores ``name`` as: None (F32) for vectors and for rows that are
    not whole blocks of 32."""
    if array.ndim != 2 or array.shape[-1] % 32:
        return None
    return GGMLQuantizationType.Q8_0 if name == "token_embd.weight" else GGMLQuantizationType.Q4_1


def convert(model_dir: Path, out: Path, alignment: int | None = None,
            quantized: str | None = None) -> Path:
    """``quantized``: None (all F32), "quantize" (Q8_0 / Q4_1, see quant_type) or
    "dequantized" (F32 holding the values "quantize" would store)."""
    cfg = json.loads((model_dir / "config.json").read_text())
    if cfg.get("model_type") != "llama":
        raise SystemExit(f"{model_dir}: model_type {cfg.get('model_type')!r}, not llama")
    w = load_file(str(model_dir / "model.safetensors"))
    n_head, n_kv = cfg["num_attention_heads"], cfg.get("num_key_value_heads",
                                                      cfg["num_attention_heads"])
    hidden = cfg["hidden_size"]
    if cfg.get("head_dim", hidden // n_head) != hidden // n_head:
        raise SystemExit("head_dim other than hidden_size / heads is not supported")
    out.parent.mkdir(parents=True, exist_ok=True)
    writer = GGUFWriter(str(out), "llama")
    writer.add_name(model_dir.name)
    writer.add_block_count(cfg["num_hidden_layers"])
    writer.add_context_length(cfg.get("max_position_embeddings", 2048))
    writer.add_embedding_length(hidden)
    writer.add_feed_forward_length(cfg["intermediate_size"])
    writer.add_head_count(n_head)
    writer.add_head_count_kv(n_kv)
    writer.add_rope_freq_base(rope_theta(cfg))
    writer.add_layer_norm_rms_eps(float(cfg.get("rms_norm_eps", 1e-6)))
    writer.add_vocab_size(cfg["vocab_size"])
    writer.add_file_type(3 if quantized == "quantize" else 0)  # mostly Q4_1, or all F32
    if alignment is not None:
        writer.add_custom_alignment(alignment)
    # keys of every other value type, the way a real file carries a tokenizer and more: the
    # engine must step over all of them
    writer.add_array("lockstep.test.strings", ["<s>", "</s>", "héllo", ""])
    writer.add_array("lockstep.test.floats", [0.5, -1.25, 3.0])
    writer.add_array("lockstep.test.ints", [1, -2, 3])
    writer.add_array("lockstep.test.nested", [[1, 2], [3]])
    writer.add_bool("lockstep.test.bool", True)
    writer.add_int8("lockstep.test.i8", -3)
    writer.add_uint8("lockstep.test.u8", 200)
    writer.add_int16("lockstep.test.i16", -300)
    writer.add_uint16("lockstep.test.u16", 60000)
    writer.add_int64("lockstep.test.i64", -(1 << 40))
    writer.add_uint64("lockstep.test.u64", 1 << 50)
    writer.add_float64("lockstep.test.f64", 2.5)
    writer.add_bos_token_id(int(cfg.get("bos_token_id") or 1))

    def put(name: str, array: np.ndarray) -> None:
        array = np.ascontiguousarray(array.astype(np.float32))
        qtype = quant_type(name, array) if quantized else None
        if qtype is None:
            writer.add_tensor(name, array)
        elif quantized == "quantize":
            writer.add_tensor(name, quantize(array, qtype), raw_dtype=qtype)
        else:
            writer.add_tensor(name, dequantize(quantize(array, qtype), qtype).astype(np.float32))

    put("token_embd.weight", w["model.embed_tokens.weight"])
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        put(f"blk.{i}.attn_norm.weight", w[p + "input_layernorm.weight"])
        put(f"blk.{i}.attn_q.weight", permute_rows(w[p + "self_attn.q_proj.weight"], n_head))
        put(f"blk.{i}.attn_k.weight", permute_rows(w[p + "self_attn.k_proj.weight"], n_kv))
        put(f"blk.{i}.attn_v.weight", w[p + "self_attn.v_proj.weight"])
        put(f"blk.{i}.attn_output.weight", w[p + "self_attn.o_proj.weight"])
        put(f"blk.{i}.ffn_norm.weight", w[p + "post_attention_layernorm.weight"])
        put(f"blk.{i}.ffn_gate.weight", w[p + "mlp.gate_proj.weight"])
        put(f"blk.{i}.ffn_up.weight", w[p + "mlp.up_proj.weight"])
        put(f"blk.{i}.ffn_down.weight", w[p + "mlp.down_proj.weight"])
    put("output_norm.weight", w["model.norm.weight"])
    if "lm_head.weight" in w and not cfg.get("tie_word_embeddings", False):
        put("output.weight", w["lm_head.weight"])
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model_dir", type=Path)
    parser.add_argument("out", type=Path)
    parser.add_argument("--alignment", type=int, default=None)
    how = parser.add_mutually_exclusive_group()
    how.add_argument("--quantize", action="store_const", const="quantize", dest="quantized")
    how.add_argument("--dequantized", action="store_const", const="dequantized",
                     dest="quantized")
    args = parser.parse_args()
    convert(args.model_dir, args.out, args.alignment, args.quantized)


if __name__ == "__main__":
    main()
