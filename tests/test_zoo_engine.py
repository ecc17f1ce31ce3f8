"""The bug zoo's mini engine: equal to transformers without a bug, and each bug where its
registry entry says lockstep should find it."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

import lockstep
from lockstep.engines import open_engine
from lockstep.errors import UsageError
from lockstep.workflows.capture import capture
from lockstep.zoo import BUGS, DIAGNOSES, ZooEngine
from models import save_tiny

PROMPT = [3, 17, 42, 7, 99, 5, 64, 11, 200]  # 9 tokens: prefill spans three KV pages of 4
DECODE = 3
FORCED = [5, 77, 150]  # fed at the decode steps of the bug tests (a random model echoes a lot)
FAMILIES = ["llama", "qwen3"]


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("zoo-models")
    return {family: save_tiny(family, root / family) for family in FAMILIES}


# zoo name -> transformers name, for the comparison with transformers
_TO_HF = (
    (r"tok_embeddings", "model.embed_tokens"),
    (r"layers\.(\d+)\.attention_norm", r"model.layers.\1.input_layernorm"),
    (r"layers\.(\d+)\.attention\.w([qkvo])(:input\.0)?", r"model.layers.\1.self_attn.\2_proj\3"),
    (r"layers\.(\d+)\.attention\.([qk]_norm)", r"model.layers.\1.self_attn.\2"),
    (r"layers\.(\d+)\.ffn_norm(:input\.0)?", r"model.layers.\1.post_attention_layernorm\2"),
    (r"layers\.(\d+)\.feed_forward\.w1", r"model.layers.\1.mlp.gate_proj"),
    (r"layers\.(\d+)\.feed_forward\.w3", r"model.layers.\1.mlp.up_proj"),
    (r"layers\.(\d+)\.feed_forward\.w2(:input\.0)?", r"model.layers.\1.mlp.down_proj\2"),
    (r"layers\.(\d+)\.attention\.rope(:[01])", r"model.layers.\1.self_attn.rope\2"),
    (r"layers\.(\d+)\.attention", r"model.layers.\1.self_attn:0"),
    (r"layers\.(\d+)\.feed_forward", r"model.layers.\1.mlp"),
    (r"layers\.(\d+)", r"model.layers.\1"),
    (r"norm", "model.norm"),
    (r"output", "lm_head"),
)

# zoo name -> canonical name: the contract with the alignment tables
_CANONICAL = (
    (r"input_ids", "input_ids"),
    (r"tok_embeddings", "embed"),
    (r"layers\.(\d+)\.attention_norm", "layers.{}.attn_norm"),
    (r"layers\.(\d+)\.attention\.wq", "layers.{}.q"),
    (r"layers\.(\d+)\.attention\.wk", "layers.{}.k"),
    (r"layers\.(\d+)\.attention\.wv", "layers.{}.v"),
    (r"layers\.(\d+)\.attention\.q_norm(?:\.block\d+)?", "layers.{}.q_norm"),
    (r"layers\.(\d+)\.attention\.k_norm(?:\.block\d+)?", "layers.{}.k_norm"),
    (r"layers\.(\d+)\.attention\.rope:0", "layers.{}.q_rope"),
    (r"layers\.(\d+)\.attention\.rope:1", "layers.{}.k_rope"),
    (r"layers\.(\d+)\.attention\.wo:input\.0", "layers.{}.attn_heads"),
    (r"layers\.(\d+)\.attention(?:\.wo)?", "layers.{}.attn_out"),
    (r"layers\.(\d+)\.ffn_norm:input\.0", "layers.{}.attn_residual"),
    (r"layers\.(\d+)\.ffn_norm", "layers.{}.mlp_norm"),
    (r"layers\.(\d+)\.feed_forward\.w1", "layers.{}.gate"),
    (r"layers\.(\d+)\.feed_forward\.w3", "layers.{}.up"),
    (r"layers\.(\d+)\.feed_forward\.w2:input\.0", "layers.{}.act"),
    (r"layers\.(\d+)\.feed_forward(?:\.w2)?", "layers.{}.down"),
    (r"layers\.(\d+)", "layers.{}.out"),
    (r"norm", "final_norm"),
    (r"output", "logits"),
)


def _rename(name: str, table: tuple[tuple[str, str], ...], canonical: bool = False) -> str:
    for pattern, target in table:
        m = re.fullmatch(pattern, name)
        if m:
            return target.format(*m.groups()) if canonical else m.expand(target)
    raise KeyError(name)


def _record(spec_or_engine: Any, out: Path, *, forced: list[int] | None = None,
            **options: Any) -> list[int]:
    """Record prefill + DECODE steps of an engine (a spec, or a loaded engine)."""
    if isinstance(spec_or_engine, str):
        return capture(spec_or_engine, str(out), tokens=PROMPT, decode=DECODE, forced=forced,
                       **options)
    with lockstep.record(out) as rec:
        return spec_or_engine.generate(rec, PROMPT, DECODE, forced=forced)


# -- without a bug: transformers' numbers ---------------------------------------------------

@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("dtype,tolerance", [("float32", 1e-5), ("float64", 1e-10)])
def test_every_tensor_matches_transformers(tmp_path, models, family, dtype, tolerance):
    path = models[family]
    tokens = _record(f"hf:{path}", tmp_path / "ref", dtype=dtype)
    assert _record(f"zoo:{path}", tmp_path / "zoo", forced=tokens, dtype=dtype) == tokens
    with lockstep.open_dump(tmp_path / "ref") as ref, lockstep.open_dump(tmp_path / "zoo") as zoo:
        assert zoo.steps == ref.steps == list(range(DECODE + 1))
        compared = 0
        for record in zoo.records:
            if record.name == "input_ids":
                continue
            theirs = ref.get(record.step, _rename(record.name, _TO_HF))
            assert theirs is not None, record.name
            mine, expected = zoo.read(record), ref.read(theirs)
            if ".rope:" in record.name:  # transformers' q and k are (batch, heads, seq, dim)
                expected = expected.transpose(0, 2, 1, 3)
            assert mine.shape == expected.shape, record.name
            error = float(np.abs(mine - expected).max())
            assert error <= tolerance, (record.step, record.name, error)
            compared += 1
        per_layer = 19 if family == "qwen3" else 17
        assert compared == (DECODE + 1) * (3 + 2 * per_layer)
        for step in ref.steps:
            np.testing.assert_array_equal(zoo.read(zoo.get(step, "input_ids")),
                                          ref.read(ref.get(step, "input_ids")))


@pytest.mark.parametrize("family", FAMILIES)
def test_bfloat16_runs_close_to_float32(tmp_path, models, family):
    with ZooEngine(f"zoo:{models[family]}", str(models[family])) as fp32:
        tokens, exact = fp32.decode_logits(PROMPT, DECODE + 1)
    with ZooEngine(f"zoo:{models[family]}", str(models[family]), dtype="bfloat16") as bf16:
        _, approx = bf16.decode_logits(PROMPT, DECODE + 1, forced=tokens[:-1])
        assert bf16.model is not None and bf16.model.output.weight.dtype == torch.bfloat16
    assert approx.dtype == np.float32 and np.isfinite(approx).all()
    assert 0 < np.abs(approx - exact).max() < 0.05 * np.abs(exact).max()


# -- the decode VM ----------------------------------------------------------------------------

@pytest.mark.parametrize("family", FAMILIES)
def test_decode_vm_is_the_normal_path_in_blocks(tmp_path, models, family):
    plain = ZooEngine(f"zoo:{models[family]}", str(models[family]))
    vm = ZooEngine(f"zoo:{models[family]}", str(models[family]), vm=True)
    plain.load()
    vm.load()
    tokens = _record(plain, tmp_path / "plain")
    assert _record(vm, tmp_path / "vm") == tokens
    with lockstep.open_dump(tmp_path / "plain") as a, lockstep.open_dump(tmp_path / "vm") as b:
        for record in b.records:
            if ".block" in record.name:
                continue
            theirs = a.get(record.step, record.name)
            assert theirs is not None, record.name
            np.testing.assert_allclose(b.read(record), a.read(theirs), rtol=0, atol=1e-5)
        for step in (1, 2, 3):  # the blocks, in order, are the flattened q_norm / k_norm
            for norm, blocks in (("q_norm", 16), ("k_norm", 8)):
                name = f"layers.1.attention.{norm}"
                if family == "llama":
                    assert b.get(step, f"{name}.block0") is None
                    continue
                assert b.get(step, name) is None and b.get(step, f"{name}.block{blocks}") is None
                joined = np.concatenate([b.read(b.get(step, f"{name}.block{i}"))
                                         for i in range(blocks)])
                np.testing.assert_allclose(joined, a.read(a.get(step, name)).ravel(), atol=1e-6)


# -- recorded names, decode_logits, the adapter -----------------------------------------------

def test_recorded_names_are_the_contract(tmp_path, models):
    expected = {"input_ids", "tok_embeddings", "norm", "output"}
    for i in range(2):
        expected |= {f"layers.{i}{suffix}" for suffix in (
            "", ".attention_norm", ".attention", ".attention.wq", ".attention.wk",
            ".attention.wv", ".attention.q_norm", ".attention.k_norm", ".attention.rope:0",
            ".attention.rope:1", ".attention.wo:input.0", ".attention.wo", ".ffn_norm:input.0",
            ".ffn_norm", ".feed_forward", ".feed_forward.w1", ".feed_forward.w3",
            ".feed_forward.w2:input.0", ".feed_forward.w2")}
    _record(f"zoo:{models['qwen3']}", tmp_path / "d")
    with lockstep.open_dump(tmp_path / "d") as dump:
        for step in dump.steps:
            assert {r.name for r in dump.in_step(step)} == expected
        first = dump.in_step(0)
        assert (first[0].name, first[0].extra.get("role")) == ("input_ids", "input")
        assert first[0].shape == (1, len(PROMPT)) and dump.in_step(1)[0].shape == (1, 1)
        assert dump.get(0, "layers.0.attention.rope:0").shape == (1, len(PROMPT), 4, 64)
        assert dump.get(0, "layers.0.attention.q_norm").shape == (1, len(PROMPT), 4, 64)
        assert dump.get(0, "layers.0.attention.wo:input.0").shape == (1, len(PROMPT), 256)
        assert dump.get(2, "output").shape == (1, 1, 320)
        assert dump.meta["head_dim"] == 64 and dump.meta["n_kv_heads"] == 2
        assert dump.meta["family"] == "qwen3" and dump.meta["bug"] is None


def test_decode_logits_contract(tmp_path, models):
    with open_engine(f"zoo:{models['llama']}") as engine:
        assert isinstance(engine, ZooEngine)
        tokens, logits = engine.decode_logits(PROMPT, 4)
        assert logits.shape == (4, 320) and logits.dtype == np.float32
        assert tokens == [int(row.argmax()) for row in logits]
        forced = [9, 8, 7]
        forced_tokens, forced_logits = engine.decode_logits(PROMPT, 4, forced=forced)
        np.testing.assert_array_equal(forced_logits[0], logits[0])  # row 0: the prefill
        assert not np.array_equal(forced_logits[1], logits[1])
        _record(engine, tmp_path / "d", forced=forced)
    with lockstep.open_dump(tmp_path / "d") as dump:
        for step in range(4):  # row i comes from feeding forced[i - 1]
            np.testing.assert_array_equal(dump.read(dump.get(step, "output"))[0, -1],
                                          forced_logits[step])
        assert [int(dump.read(dump.get(s, "input_ids"))[0, -1]) for s in (1, 2, 3)] == forced


def test_live_model_sampling_and_errors(tmp_path, models):
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(models["qwen3"])
    engine = ZooEngine.from_transformers(hf, temperature=1.0, seed=1)
    with ZooEngine(f"zoo:{models['qwen3']}", str(models["qwen3"])) as greedy:
        assert engine.meta()["vocab_size"] == 320
        sampled = engine.decode_logits(PROMPT, 12)[0]
        assert sampled == engine.decode_logits(PROMPT, 12)[0]  # seeded
        assert sampled != greedy.decode_logits(PROMPT, 12)[0]
        with pytest.raises(UsageError, match="no tokenizer"):
            greedy.tokenize("hello")
    with pytest.raises(UsageError, match="unknown zoo bug"):
        ZooEngine("zoo:x", "x", bug="nope")
    with pytest.raises(UsageError, match="needs a qwen3 model"):
        ZooEngine("zoo:x", str(models["llama"]), bug="blocked_qk_norm").load()
    with pytest.raises(UsageError, match="not a transformers model directory"):
        ZooEngine("zoo:x", str(tmp_path)).load()


# -- the bugs ---------------------------------------------------------------------------------

def test_registry_is_complete():
    required = {"swapped_args", "wrong_decode_token", "wrong_decode_position", "wrong_kv_slot",
                "blocked_qk_norm", "lm_head_layout", "rope_interleaved", "bad_temperature",
                "token_as_tensor", "layer_not_loaded", "nan_adapter"}
    assert required <= set(BUGS)
    public = [b for b in BUGS.values() if b.source.startswith("https://github.com/")]
    assert len(public) >= 4
    assert {"layout", "zeros", "stale", "op", "rope"} <= {b.diagnosis for b in public}
    for bug in BUGS.values():
        assert bug.diagnosis in DIAGNOSES and bug.step in (0, 1)
        assert bug.description.count(". ") == 0 and bug.description.endswith(".")
        assert re.fullmatch(r"tokens|input_ids|embed|final_norm|logits|layers\.\d+\.[\w.]+",
                            bug.tensor)


def _first_difference(clean: Path, buggy: Path) -> tuple[int, str]:
    """(step, canonical name) of the first record that differs, in capture order; the name is
    "tokens" when every record is equal."""
    with lockstep.open_dump(clean) as a, lockstep.open_dump(buggy) as b:
        for step in a.steps:
            for record in b.in_step(step):
                theirs = a.get(step, record.name)
                if theirs is None or theirs.shape != record.shape or not np.array_equal(
                        a.read(theirs), b.read(record), equal_nan=True):
                    return step, _rename(record.name, _CANONICAL, canonical=True)
    return -1, "tokens"


@pytest.fixture(scope="module")
def clean_runs(models, tmp_path_factory) -> dict[tuple[str, bool], tuple[Path, list[int]]]:
    """The bug-free dump and tokens of each family, with and without the decode VM."""
    root = tmp_path_factory.mktemp("zoo-clean")
    runs = {}
    for family in FAMILIES:
        for vm in (False, True):
            out = root / f"{family}-{vm}"
            runs[family, vm] = out, _record(f"zoo:{models[family]}", out, vm=vm, forced=FORCED)
    return runs


@pytest.mark.parametrize("name,family", [(name, family) for name, bug in BUGS.items()
                                         for family in bug.families if family in FAMILIES])
def test_bug_shows_where_the_registry_says(tmp_path, models, clean_runs, family, name):
    bug = BUGS[name]
    vm = name == "blocked_qk_norm"
    clean, tokens = clean_runs[family, vm]
    chosen = _record(f"zoo:{models[family]}", tmp_path / "bug", forced=FORCED, bug=name)
    step, tensor = _first_difference(clean, tmp_path / "bug")
    if bug.tensor == "tokens":
        assert step == -1 and chosen[bug.step] != tokens[bug.step]
    else:
        assert (step, tensor) == (bug.step, bug.tensor)
    with lockstep.open_dump(tmp_path / "bug") as dump, lockstep.open_dump(clean) as reference:
        assert dump.meta["bug"] == name
        _check_symptom(name, dump, reference, chosen)


def _check_symptom(name: str, dump: Any, reference: Any, chosen: list[int]) -> None:
    """The bug's own symptom, beyond "something differs"."""
    def read(step: int, record: str, source: Any = dump) -> np.ndarray:
        return source.read(source.get(step, record))

    if name == "swapped_args":
        assert read(0, "input_ids").tolist() == [list(range(len(PROMPT)))]
    elif name == "heads_no_transpose":  # the same numbers, in (heads, seq) order
        heads = read(0, "layers.0.attention.wo:input.0", reference)
        transposed = heads.reshape(1, len(PROMPT), 4, -1).transpose(0, 2, 1, 3)
        np.testing.assert_array_equal(read(0, "layers.0.attention.wo:input.0"),
                                      transposed.reshape(heads.shape))
    elif name == "decode_attn_zeros":
        assert not read(1, "layers.0.attention.wo:input.0").any()
        assert read(0, "layers.0.attention.wo:input.0").any()
    elif name == "stale_hidden":
        for step in (1, 2, 3):
            np.testing.assert_array_equal(read(step, "norm")[0, -1], read(0, "norm")[0, -1])
    elif name == "nan_adapter":
        assert np.isnan(read(0, "layers.1.attention.wq")).all()
        assert not np.isnan(read(0, "layers.0.attention.wq")).any()
    elif name == "blocked_qk_norm":  # each block has an RMS of 1 (norm weights are all 1)
        for block in range(16):
            values = read(1, f"layers.0.attention.q_norm.block{block}")
            assert np.sqrt((values ** 2).mean()) == pytest.approx(1, rel=1e-4)
    elif name == "token_as_tensor":
        assert len(set(chosen)) == 1
    elif name == "bad_temperature":
        logits = read(0, "output")[0, -1]
        assert chosen[0] == int(np.argmax(logits > 0))
