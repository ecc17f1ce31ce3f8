"""Replay on the real SmolLM2 Q4_1 GGUF, transformers against llama.cpp: the error llama.cpp's
first projection introduces is what its own quantization gives (Q4_1 weights, activations
rounded to 8-bit blocks of 32 as its CPU dot product does), measured, where bfloat16 operands
would give a third of it."""

from __future__ import annotations

import pytest

pytest.importorskip("llama_cpp")
pytest.importorskip("transformers")
pytest.importorskip("gguf")

from lockstep.workflows.diff import diff
from test_llamacpp import PROMPT_IDS, _gguf


def test_llamacpp_projection_error_is_explained_by_its_gguf_quantization(tmp_path):
    gguf = _gguf()
    result = diff(f"hf:{gguf}", f"llamacpp:{gguf}", tmp_path, tokens=PROMPT_IDS, decode=0)
    assert result.verdict == "drift"
    op = result.replay.first
    assert op is not None and op.reference == "model.layers.0.self_attn.q_proj"
    assert op.where == "introduced"
    quant = op.rounding["gguf:Q4_1"]
    assert op.introduced == pytest.approx(quant, rel=0.25), op.rounding
    assert op.introduced > 2 * op.rounding["bfloat16"]  # not what bfloat16 operands give
    assert op.explained_by == "gguf:Q4_1"
    # a GGUF rounding is reported; the comparison is not redone as a float precision
    assert result.replay.precision is None
    assert op.reverse is None and op.reverse_note is None  # llama.cpp has no module tree
