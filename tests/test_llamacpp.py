"""The llama.cpp adapter on the real SmolLM2-135M Q4_1 GGUF: names, shapes, steps, tokens."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

pytest.importorskip("llama_cpp")

import lockstep
from lockstep.engines import llamacpp as adapter
from lockstep.engines.llamacpp import LlamaCppEngine
from lockstep.errors import LockstepError, MissingExtraError, UsageError
from lockstep.store.reader import open_dump

PROMPT = "The capital of France is"
PROMPT_IDS = [504, 3575, 282, 4649, 314]
GREEDY = [7042, 30, 198, 198, 504]  # transformers float32 on the same GGUF
DECODE = 4
N_LAYER = 30

#: every layer's records, in graph order (llm_build_llama in llama-cpp-python 0.3.36), with
#: their numpy shapes for the 5-token prefill in a 256-token context
LAYER_RECORDS = {
    "norm-{i}": (1, 1, 5, 576),
    "attn_norm-{i}": (1, 1, 5, 576),
    "Qcur-{i}": (1, 1, 5, 576),
    "Qcur-{i}:reshape": (1, 5, 9, 64),
    "Qcur-{i}:rope": (1, 5, 9, 64),
    "Vcur-{i}": (1, 1, 5, 192),
    "Vcur-{i}:reshape": (1, 5, 3, 64),
    "Kcur-{i}": (1, 1, 5, 192),
    "Kcur-{i}:reshape": (1, 5, 3, 64),
    "Kcur-{i}:rope": (1, 5, 3, 64),
    "Kcur-{i} (view)": (1, 1, 5, 192),
    "cache_k_l{i} (view)": (1, 1, 256, 192),
    "Vcur-{i} (reshaped)": (1, 1, 5, 192),
    "Vcur-{i} (reshaped) (reshaped)": (1, 1, 960, 1),
    "cache_v_l{i} (reshaped)": (1, 1, 49152, 1),
    "cache_v_l{i} (reshaped) (view)": (1, 1, 49152, 1),
    "cache_v_l{i} (view)": (1, 64, 3, 256),
    "cache_v_l{i} (view) (permuted)": (1, 3, 64, 256),
    "cache_k_l{i} (view):view": (1, 256, 3, 64),
    "cache_k_l{i} (view) (permuted)": (1, 3, 256, 64),
    "Qcur-{i} (view)": (1, 5, 9, 64),
    "Qcur-{i} (view) (permuted)": (1, 9, 5, 64),
    "kq-{i}": (1, 9, 5, 256),
    "kq_soft_max-{i}": (1, 9, 5, 256),
    "kqv-{i}": (1, 9, 5, 64),
    "kqv-{i} (permuted)": (1, 5, 9, 64),
    "kqv_out-{i}": (1, 1, 5, 576),
    "attn_out-{i}": (1, 1, 5, 576),
    "ffn_inp-{i}": (1, 1, 5, 576),
    "norm-{i}:rms_norm": (1, 1, 5, 576),
    "ffn_norm-{i}": (1, 1, 5, 576),
    "ffn_gate-{i}": (1, 1, 5, 1536),
    "ffn_up-{i}": (1, 1, 5, 1536),
    "ffn_swiglu-{i}": (1, 1, 5, 1536),
    "ffn_out-{i}": (1, 1, 5, 576),
    "l_out-{i}": (1, 1, 5, 576),
}
FINAL_RECORDS = {
    "embd": (1, 1, 5, 576),
    "norm": (1, 1, 5, 576),
    "result_norm": (1, 1, 5, 576),
    "result_output": (1, 1, 5, 49152),
}
F16 = ("cache_k_l", "cache_v_l")


def _gguf():
    from lockstep.demo import find_smollm2

    try:
        return find_smollm2()
    except LockstepError as exc:
        pytest.skip(str(exc))


@pytest.fixture(scope="module")
def gguf():
    return _gguf()


@pytest.fixture(scope="module")
def engine(gguf):
    eng = LlamaCppEngine(f"llamacpp:{gguf}", str(gguf), views=True)
    eng.load()
    yield eng
    eng.close()


@pytest.fixture(scope="module")
def run(engine, tmp_path_factory):
    """One recording of the prompt with 4 greedy decode steps: (dump, chosen tokens)."""
    path = tmp_path_factory.mktemp("llamacpp") / "run.lsd"
    ids = engine.tokenize(PROMPT)
    with lockstep.record(path, meta={**engine.meta(), "prompt_token_ids": ids}) as rec:
        tokens = engine.generate(rec, ids, DECODE)
    dump = open_dump(path)
    yield dump, tokens
    dump.close()


def _names(dump, step):
    return [r.name for r in dump.in_step(step)]


def test_tokenize_matches_transformers(engine):
    assert engine.tokenize(PROMPT) == PROMPT_IDS


def test_greedy_tokens_match_transformers_float32(run):
    _, tokens = run
    assert tokens == GREEDY


def test_steps_and_input_ids(run):
    dump, tokens = run
    assert dump.complete
    assert dump.steps == list(range(DECODE + 1))
    first = dump.get(0, "input_ids")
    assert first.dtype == "int64" and first.shape == (1, 5)
    assert dump.read(first).tolist() == [PROMPT_IDS]
    for step in range(1, DECODE + 1):
        rec = dump.get(step, "input_ids")
        assert rec.shape == (1, 1)
        assert dump.read(rec).tolist() == [[tokens[step - 1]]]
        assert _names(dump, step)[0] == "input_ids"


def test_every_layer_recorded_with_numpy_shapes(run):
    dump, _ = run
    by_name = {r.name: r for r in dump.in_step(0)}
    expected = dict(FINAL_RECORDS)
    for i in range(N_LAYER):
        expected.update({k.format(i=i): v for k, v in LAYER_RECORDS.items()})
    missing = sorted(set(expected) - set(by_name))
    assert not missing, missing
    for name, shape in expected.items():
        rec = by_name[name]
        assert rec.shape == shape, (name, rec.shape)
        assert rec.dtype == ("float16" if name.startswith(F16) else "float32"), name
        assert rec.call == 0, name
    # graph order within a layer is kept
    names = _names(dump, 0)
    layer0 = [k.format(i=0) for k in LAYER_RECORDS]
    assert [n for n in names if n in set(layer0)] == layer0
    # nothing else but the two row selections of the last layer (unnamed: ggml's node_N)
    other = set(by_name) - set(expected) - {"input_ids"}
    assert len(other) == 2 and all(n.startswith("node_") for n in other), other
    # each decode step records the same names, with one token
    for step in range(1, DECODE + 1):
        assert set(_names(dump, step)) == set(by_name)
        assert dump.get(step, "attn_norm-7").shape == (1, 1, 1, 576)
        assert dump.get(step, "kq_soft_max-7").shape == (1, 9, 1, 256)


def test_records_carry_the_ggml_op(run):
    dump, _ = run

    def op(name):
        extra = dump.get(0, name).extra
        return extra.get("op", extra.get("role"))

    assert op("Qcur-3") == "mul_mat"
    assert op("Qcur-3:reshape") == "reshape"
    assert op("Qcur-3:rope") == "rope"
    assert op("ffn_swiglu-3") == "swiglu"
    assert op("kq_soft_max-3") == "soft_max"
    assert op("cache_v_l3 (view) (permuted)") == "permute"


def test_views_and_permutes_read_through_strides(run):
    dump, _ = run

    def get(name, step=0):
        return dump.read(dump.get(step, name))

    for i in (0, 17):
        rope = get(f"Qcur-{i}:rope")
        np.testing.assert_array_equal(get(f"Qcur-{i} (view)"), rope)
        np.testing.assert_array_equal(get(f"Qcur-{i} (view) (permuted)"),
                                      rope.transpose(0, 2, 1, 3))
        np.testing.assert_array_equal(get(f"kqv-{i} (permuted)"),
                                      get(f"kqv-{i}").transpose(0, 2, 1, 3))
        np.testing.assert_array_equal(get(f"Qcur-{i}:reshape").reshape(1, 1, 5, 576),
                                      get(f"Qcur-{i}"))
        # the V cache (f16, stored transposed, read through a strided view) holds Vcur
        vview = get(f"cache_v_l{i} (view)")  # [dim, head, position]
        v = vview[0, :, :, :5].transpose(2, 1, 0).reshape(5, 192)
        np.testing.assert_array_equal(v, get(f"Vcur-{i}")[0, 0].astype(np.float16))
        np.testing.assert_array_equal(get(f"cache_v_l{i} (view) (permuted)"),
                                      vview.transpose(0, 2, 1, 3))
        # the K cache holds the roped K
        kview = get(f"cache_k_l{i} (view):view")  # [position, head, dim]
        np.testing.assert_array_equal(kview[0, :5],
                                      get(f"Kcur-{i}:rope")[0].astype(np.float16))
    # softmax rows sum to one over the 5 real positions, the padded rest is masked
    probs = get("kq_soft_max-4")
    np.testing.assert_allclose(probs.sum(-1), 1.0, atol=1e-5)
    assert not probs[..., 5:].any()


def test_result_output_holds_all_positions_and_the_chosen_token(run):
    dump, tokens = run
    for step in range(DECODE + 1):
        logits = dump.read(dump.get(step, "result_output"))
        assert int(np.argmax(logits[0, 0, -1])) == tokens[step]
    assert np.isfinite(dump.read(dump.get(0, "result_output"))).all()


def test_meta(engine):
    meta = engine.meta()
    assert meta["engine"] == "llama.cpp"
    assert meta["quantization"] == "Q4_1"
    assert meta["vocab_size"] == 49152
    assert meta["n_threads"] >= 1
    assert meta["head_dim"] == 64
    assert meta["llama_cpp_python_version"] == __import__("llama_cpp").__version__
    assert meta["model"].endswith(".gguf")


def test_attn_norm_matches_transformers(run, gguf, tmp_path):
    pytest.importorskip("transformers")
    from lockstep.engines.hf import HFEngine

    dump, _ = run
    ref = HFEngine(f"hf:{gguf}", str(gguf))
    ref.load()
    try:
        with lockstep.record(tmp_path / "hf.lsd", include=["input_ids", "*.input_layernorm"]) \
                as rec:
            ref_tokens = ref.generate(rec, PROMPT_IDS, 0)
    finally:
        ref.close()
    assert ref_tokens == GREEDY[:1]
    with open_dump(tmp_path / "hf.lsd") as hf:
        for layer in (0, 1):
            want = hf.read(hf.get(0, f"model.layers.{layer}.input_layernorm")).reshape(5, 576)
            got = dump.read(dump.get(0, f"attn_norm-{layer}")).reshape(5, 576)
            rel = np.linalg.norm(got - want) / np.linalg.norm(want)
            assert rel < 1e-2, (layer, rel)


def test_teacher_forcing_and_name_selection(engine, tmp_path):
    forced = [100, 200, 300]
    with lockstep.record(tmp_path / "forced.lsd",
                         include=["input_ids", "result_output", "Qcur-2", "Qcur-2[: ]*"]) as rec:
        tokens = engine.generate(rec, PROMPT_IDS, 3, forced=forced)
    assert tokens[0] == GREEDY[0]
    with open_dump(tmp_path / "forced.lsd") as dump:
        assert {r.name for r in dump} == {"input_ids", "result_output", "Qcur-2",
                                          "Qcur-2:reshape", "Qcur-2:rope",
                                          "Qcur-2 (view)", "Qcur-2 (view) (permuted)"}
        fed = [dump.read(dump.get(s, "input_ids")).tolist() for s in (1, 2, 3)]
        assert fed == [[[100]], [[200]], [[300]]]
        for step in range(4):
            logits = dump.read(dump.get(step, "result_output"))
            assert int(np.argmax(logits[0, 0, -1])) == tokens[step]


def test_layout_mismatch_is_a_clear_error(engine, tmp_path, monkeypatch):
    monkeypatch.setattr(adapter, "_NAME_OFFSET", adapter._NAME_OFFSET - 8)
    with pytest.raises(LockstepError, match=r"llama-cpp-python 0\.3\.\d+.*layout"):
        with lockstep.record(tmp_path / "bad.lsd") as rec:
            engine.generate(rec, PROMPT_IDS, 0)


def test_generate_again_after_an_error_works(engine, tmp_path):
    with lockstep.record(tmp_path / "again.lsd", include=["result_output"]) as rec:
        assert engine.generate(rec, PROMPT_IDS, 1) == GREEDY[:2]


def test_bad_path_is_a_usage_error(tmp_path):
    with pytest.raises(UsageError, match="not a file"):
        LlamaCppEngine("llamacpp:nope.gguf", str(tmp_path / "nope.gguf")).load()


def test_missing_llama_cpp_is_a_missing_extra(monkeypatch, gguf):
    monkeypatch.setitem(sys.modules, "llama_cpp", None)
    with pytest.raises(MissingExtraError, match=r"llama_cpp.*lockstep\[llamacpp\]"):
        LlamaCppEngine(f"llamacpp:{gguf}", str(gguf)).load()


def test_importing_the_adapter_does_not_import_llama_cpp():
    code = ("import sys, lockstep, lockstep.engines.llamacpp; "
            "assert 'llama_cpp' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_pure_views_are_left_out_by_default(gguf, tmp_path):
    eng = LlamaCppEngine(f"llamacpp:{gguf}", str(gguf))
    eng.load()
    try:
        with lockstep.record(tmp_path / "d") as rec:
            eng.generate(rec, PROMPT_IDS, 0)
    finally:
        eng.close()
    with open_dump(tmp_path / "d") as dump:
        names = {r.name for r in dump}
        ops = {r.extra.get("op") for r in dump}
        assert not ops & {"view", "reshape", "permute", "transpose"}
        # what holds new values stays: the projections, the RoPE, the KV cache writes
        assert {"Qcur-0", "Qcur-0:rope", "cache_k_l0 (view)", "kq_soft_max-0",
                "kqv_out-0", "result_output"} <= names
        assert "Qcur-0:reshape" not in names
    assert eng.meta()["views_recorded"] is False
