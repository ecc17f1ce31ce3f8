"""Pairing through name tables and layout transforms."""

from __future__ import annotations

import numpy as np
import torch

import lockstep
from lockstep.align.tables import LLAMA_CPP, TRANSFORMERS_LLAMA, detect_table
from lockstep.align.transforms import apply_transform
from models import PROMPT, tiny

HEAD_DIM = 16


def gguf_permute(x: np.ndarray, head_dim: int) -> np.ndarray:
    """What GGUF conversion does to Q/K rows (here: output features) within each head."""
    lead = x.shape[:-1]
    return np.swapaxes(x.reshape(*lead, -1, 2, head_dim // 2), -1, -2).reshape(x.shape)


def test_rope_interleaved_undoes_the_gguf_permutation():
    x = np.arange(2 * 3 * 64, dtype=np.float32).reshape(2, 3, 64)
    permuted = gguf_permute(x, HEAD_DIM)
    assert not np.array_equal(permuted, x)
    back = apply_transform("rope_interleaved", permuted, {"head_dim": HEAD_DIM})
    np.testing.assert_array_equal(back, x)


def test_tables_know_their_names():
    assert TRANSFORMERS_LLAMA.lookup("model.layers.7.mlp.down_proj:input.0") == (
        "layers.7.act", None)
    assert LLAMA_CPP.lookup("Qcur-12") == ("layers.12.q", "rope_interleaved")
    assert LLAMA_CPP.lookup("Qcur-12:rope") == ("layers.12.q_rope", "rope_interleaved")
    assert detect_table(["attn_norm-0", "Qcur-0", "l_out-0", "result_output"]) is LLAMA_CPP
    assert detect_table(["foo", "bar"]) is None


# transformers names -> what llama.cpp calls the same tensor (and whether Q/K are permuted)
_RENAME = {
    "input_ids": "input_ids", "model.embed_tokens": "inp_embd", "model.norm": "result_norm",
    "lm_head": "result_output",
}
_LAYER = {
    "input_layernorm": "attn_norm", "self_attn.q_proj": "Qcur", "self_attn.k_proj": "Kcur",
    "self_attn.v_proj": "Vcur", "self_attn.o_proj:input.0": "kqv_out",
    "self_attn.o_proj": "attn_out", "post_attention_layernorm:input.0": "ffn_inp",
    "post_attention_layernorm": "ffn_norm", "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up", "mlp.down_proj:input.0": "ffn_swiglu",
    "mlp.down_proj": "ffn_out", "": "l_out",
}


def _as_llama_cpp(name: str) -> str | None:
    if name in _RENAME:
        return _RENAME[name]
    parts = name.split(".", 3)
    if parts[:2] != ["model", "layers"] or not parts[2].split(":")[0].isdigit():
        return None
    layer, _, rest = name[len("model.layers."):].partition(".")
    gg = _LAYER.get(rest if rest else "")
    return f"{gg}-{layer}" if gg else None


def test_llama_cpp_names_pair_through_the_tables(tmp_path):
    """A dump with llama.cpp's names and Q/K row order pairs with transformers' by table."""
    model = tiny("llama")
    with lockstep.record(tmp_path / "ref") as rec, torch.no_grad():
        rec.watch(model, inputs=["*.o_proj", "*.post_attention_layernorm", "*.down_proj"])
        lockstep.probe("input_ids", torch.tensor([PROMPT]))
        model(torch.tensor([PROMPT]))
    with lockstep.open_dump(tmp_path / "ref") as ref, \
            lockstep.record(tmp_path / "cand", meta={"head_dim": HEAD_DIM}):
        for r in ref:
            gg = _as_llama_cpp(r.name)
            if gg is None:
                continue
            arr = np.array(ref.read(r)).reshape(r.shape[1:] if r.shape[0] == 1 else r.shape)
            if gg.startswith(("Qcur", "Kcur")):
                arr = gguf_permute(arr, HEAD_DIM)
            lockstep.probe(gg, arr)
    result = lockstep.compare(tmp_path / "ref", tmp_path / "cand")
    assert result.verdict == "match"
    by_table = [p for p in result.results if p.how == "table"]
    assert len(by_table) == 2 * 13 + 3  # every layer op, embeddings, final norm, logits
    q = next(p for p in result.results if p.canonical == "layers.1.q")
    assert (q.cand_name, q.transform, q.error) == ("Qcur-1", "rope_interleaved", 0.0)
    # without the tables nothing lines up by name, and order+shape pairing is not enough
    from lockstep.align.pairing import align
    with lockstep.open_dump(tmp_path / "ref") as r, lockstep.open_dump(tmp_path / "cand") as c:
        assert sum(p.how == "table" for p in align(r, c, use_tables=False).pairs) == 0
