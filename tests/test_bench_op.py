"""lockstep bench --op: one op of each implementation (transformers' attention, the zoo's)
timed on the inputs their dumps recorded, with the error between them."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from lockstep.bench.op import bench_op  # noqa: E402
from lockstep.workflows.capture import capture  # noqa: E402

TOKENS = [3, 17, 42, 7, 99]


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "lockstep.cli.main", *args],
                          capture_output=True, text=True, timeout=600,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"})


@pytest.fixture(scope="module")
def dumps(tmp_path_factory) -> dict[str, Path]:
    from transformers import LlamaConfig, LlamaForCausalLM

    root = tmp_path_factory.mktemp("opbench")
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(
        vocab_size=320, hidden_size=128, intermediate_size=176, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
    )).save_pretrained(root / "llama")
    out = {"ref": root / "ref.lsd", "zoo": root / "zoo.lsd", "bug": root / "bug.lsd"}
    capture(f"hf:{root / 'llama'}", str(out["ref"]), tokens=TOKENS, decode=1)
    capture(f"zoo:{root / 'llama'}", str(out["zoo"]), tokens=TOKENS, decode=1)
    capture(f"zoo:{root / 'llama'}", str(out["bug"]), tokens=TOKENS, decode=1,
            bug="gqa_tiled_kv")
    return out


def test_transformers_attention_against_the_zoos_on_recorded_inputs(dumps):
    r = bench_op(str(dumps["ref"]), str(dumps["zoo"]), "model.layers.0.self_attn",
                 warmup=1, iters=5)
    assert r.step == 0
    assert (r.reference.cls, r.candidate.cls) == ("LlamaAttention", "Attention")
    # the attention output is left unpaired by the comparison (it equals o_proj's); the op
    # bench pairs it by value with the zoo's whole attention module, not its wo inside
    assert r.candidate.module == "layers.0.attention"
    # each op ran on the tensor its own dump recorded as its input, and reproduced its output
    assert r.reference.input_record == "model.layers.0.input_layernorm"
    assert r.candidate.input_record == "layers.0.attention_norm"
    assert r.reference.reproduces == 0.0 and r.candidate.reproduces == 0.0
    assert r.same_input_error is not None and r.same_input_error < 1e-5
    for side in (r.reference, r.candidate):
        assert side.time is not None and side.time.n == 5 and side.time.median > 0
    assert r.ratio is not None and r.ratio.low <= r.ratio.value <= r.ratio.high
    json.dumps(r.to_json())


def test_a_broken_attention_shows_its_own_error_and_the_bug_is_rerun(dumps, tmp_path):
    got = _cli("bench", "--op", "model.layers.1.self_attn", str(dumps["ref"]),
               str(dumps["bug"]), "--warmup", "1", "--iters", "3",
               "--json", str(tmp_path / "op.json"))
    assert got.returncode == 0, got.stderr
    data = json.loads((tmp_path / "op.json").read_text())
    assert data["candidate"]["module"] == "layers.1.attention"
    # the dump's bug option is re-applied (the rerun reproduces what was recorded), and the
    # candidate's op on the reference's own input is wrong by itself
    assert data["candidate"]["reproduces"] == 0.0
    assert data["same_input_error"] > 0.05
    assert "error on the same input" in " ".join(got.stdout.split())


def test_op_bench_usage_errors_are_one_line(dumps):
    got = _cli("bench", "--op", "model.layers.9.nothing", str(dumps["ref"]), str(dumps["zoo"]))
    assert got.returncode == 2 and "no such record" in got.stderr
    # transformers' attention at a decode step updates its KV cache on every call
    got = _cli("bench", "--op", "model.layers.0.self_attn", str(dumps["ref"]),
               str(dumps["zoo"]), "--step", "1", "--iters", "2")
    assert got.returncode == 2 and "bench it at the prefill" in got.stderr
    got = _cli("bench", f"hf:{dumps['ref']}", f"zoo:{dumps['ref']}")
    assert got.returncode == 2 and "give the prompt" in got.stderr
    for g in (got,):
        assert "Traceback" not in g.stderr


@pytest.mark.parametrize("bug", [None, "swapped_kv_rows"])
def test_a_vllm_shaped_attention_takes_its_hidden_states_not_its_positions(dumps, tmp_path, bug):
    """The nano-vLLM engine's attention is called ``self_attn(positions, hidden_states)``, as
    vLLM's is: its input is the float tensor, the normed hidden states its dump recorded as
    ``input_layernorm:0`` (the first of the fused norm's (normed, residual)), not the
    integer positions before it; so the op runs on the reference's input too."""
    from engines.nano_vllm import SPEC as spec

    options = {"model": str(dumps["ref"].parent / "llama"), **({"bug": bug} if bug else {})}
    out = tmp_path / "nano.lsd"
    capture(spec, str(out), tokens=TOKENS, decode=1, **options)
    r = bench_op(str(dumps["ref"]), str(out), "model.layers.1.self_attn", warmup=1, iters=3,
                 cand_options=options)
    assert (r.candidate.cls, r.candidate.module) == ("SelfAttention", "model.layers.1.self_attn")
    assert r.candidate.input_record == "model.layers.1.input_layernorm:0"
    assert r.candidate.reproduces == 0.0
    assert r.same_input_error is not None
    if bug is None:
        assert r.same_input_error < 1e-5 and not r.notes
    else:  # the loader's k/v rows swapped: the op is wrong by itself, on the same input
        assert r.same_input_error > 0.05


def test_a_fused_add_norm_is_timed_but_given_no_same_input_error(dumps, tmp_path):
    """vLLM's ``input_layernorm(x, residual)`` adds the residual beside its input: fed the
    reference's input alone it is another op, so no same-input error is claimed."""
    from engines.nano_vllm import SPEC as spec

    options = {"model": str(dumps["ref"].parent / "llama")}
    out = tmp_path / "nano.lsd"
    capture(spec, str(out), tokens=TOKENS, decode=1, **options)
    r = bench_op(str(dumps["ref"]), str(out), "model.layers.1.input_layernorm", warmup=1,
                 iters=3, cand_options=options)
    assert r.candidate.cls == "RMSNorm" and r.candidate.reproduces == 0.0
    assert r.same_input_error is None
    assert any("second activation" in note for note in r.notes), r.notes
    assert r.candidate.time is not None and r.candidate.time.n == 3
