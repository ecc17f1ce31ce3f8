"""``lockstep check``: the red flags of one dump, with no reference (lockstep.health).

Healthy dumps give no red flag: tiny random Llama and Qwen3 under transformers, the C engine
(tests/engines/c_llama) with its attention probabilities, and SmolLM2-135M under
transformers, llama.cpp and the C engine (skipped where the model or llama.cpp is missing).
Each bug of the C engine that a single dump can show is flagged at its step and record, with
data and as statistics only.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from engines import c_llama
from engines.c_llama import to_gguf
from lockstep.cli.main import main
from lockstep.health import check_dump
from lockstep.workflows.capture import capture
from models import save_tiny

PROMPT = [3, 17, 42, 7, 99, 5, 64, 11, 200]
FORCED = [200, 5, 64, 11]  # teacher forcing: the tokens fed change at every decode step
SMOL_PROMPT = [1, 9690, 198, 2683, 359, 253, 5356, 5646, 11173, 3365, 3511, 308, 34519, 28,
               7018, 411, 407, 19712, 8182, 2]
SMOL_DECODE = 4


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = tmp_path_factory.mktemp("health")
    llama = save_tiny("llama", root / "llama")
    qwen3 = save_tiny("qwen3", root / "qwen3")
    return {"root": root, "llama": llama, "qwen3": qwen3,
            "gguf": to_gguf.convert(llama, root / "tiny.gguf")}


def run_engine(c_engine: Path, gguf: Path, out: Path, *args: str, prompt: list[int] = PROMPT,
               forced: list[int] | None = FORCED, decode: int = 4) -> Path:
    done = c_llama.run(c_engine, gguf, out, prompt, decode, forced, "--probs", *args)
    assert done.returncode == 0, done.stderr
    return out


def red(path: Path, step: int | None = None) -> list:
    return check_dump(path, step=step).red


# ------------------------------------------------------------------ healthy dumps

NANO = f"py:{Path(__file__).parent / 'engines' / 'nano_vllm.py'}:NanoEngine"


@pytest.mark.parametrize("bug, flagged", [(None, None), ("rope_off", "rope"),
                                          ("skip_layer", "skipped_layer")], ids=str)
def test_an_engine_shaped_like_vllm_is_checked_through(tiny, tmp_path, bug, flagged):
    """The nano engine (vLLM's and SGLang's shapes): q and k come out of a fused qkv_proj,
    and each layer returns (hidden, residual) that the next norm adds. Before, RoPE and the
    layers were not checked at all there ('no q/k recorded both before and after RoPE', 'no
    two consecutive layer outputs with data'; explode 0 records), so RoPE never applied and a
    layer whose result is dropped passed as healthy. Now q (k) before RoPE is read from
    qkv_proj's columns, and the last layer's output is the final norm's residual sum."""
    out = tmp_path / "run.lsd"
    capture(NANO, str(out), tokens=PROMPT, decode=2, forced=FORCED[:2],
            model=str(tiny["llama"]), **({"bug": bug} if bug else {}))
    report = check_dump(out)
    for check in ("rope", "skipped_layer", "explode"):
        assert report.checked[check].records > 0, (check, report.checked[check])
    assert [f.check for f in report.red] == ([flagged] if flagged else []), report.red
    if bug == "skip_layer":
        (flag,) = report.red
        assert flag.record == "model.norm:1" and flag.figures["layer"] == 1

@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_tiny_transformers_models_are_healthy(tiny, tmp_path, family):
    out = tmp_path / "run.lsd"
    capture(f"hf:{tiny[family]}", str(out), tokens=PROMPT, decode=4)
    report = check_dump(out)
    assert report, report.red
    assert report.checked["rope"].records > 0  # q and k before and after RoPE were compared
    # attention re-enacted from its q, k and v in each layer at each of the 5 steps
    assert report.checked["attention_output"].records == 2 * 5
    assert report.checked["stuck"].records > 0


@pytest.mark.parametrize("forced", [FORCED, None], ids=["forced", "free-running"])
def test_c_engine_without_bugs_is_healthy(c_engine, tiny, tmp_path, forced):
    report = check_dump(run_engine(c_engine, tiny["gguf"], tmp_path / "c.lsd", forced=forced))
    assert report, report.red
    assert report.checked["attention"].records == 10  # L0.att_p, L1.att_p at 5 steps
    if forced is None:  # greedy on a random model: 200 again and again, said as information
        assert [f.check for f in report.flags] == ["repetition"]


@pytest.fixture(scope="module")
def smollm2(smollm2_gguf: Path) -> Path:
    return smollm2_gguf


def test_smollm2_transformers_is_healthy(smollm2, tmp_path):
    """A real model's attention sink (the first token reaches 2.5e4 from layer 11 on, 222
    times layer 10's) is not an explosion."""
    from lockstep.engines.hf import gguf_as_safetensors

    try:
        model = gguf_as_safetensors(smollm2)
    except Exception as exc:  # the conversion needs transformers' gguf extra
        pytest.skip(f"SmolLM2 through transformers is not available: {exc}")
    out = tmp_path / "hf.lsd"
    capture(f"hf:{model}", str(out), tokens=SMOL_PROMPT, decode=SMOL_DECODE)
    report = check_dump(out)
    assert report, report.red
    assert report.checked["explode"].figures["largest_layer_ratio"] < 10


def test_smollm2_llamacpp_is_healthy(smollm2, tmp_path):
    pytest.importorskip("llama_cpp", reason="llama-cpp-python is not importable")
    out = tmp_path / "llamacpp.lsd"
    capture(f"llamacpp:{smollm2}", str(out), tokens=SMOL_PROMPT, decode=SMOL_DECODE)
    report = check_dump(out)
    assert report, report.red
    attention = report.checked["attention"]
    assert attention.records == 30 * (SMOL_DECODE + 1)  # kq_soft_max-N
    # a sink: some layer puts most of every query's weight on token 0, far from "all"
    assert 0.3 < attention.figures["max_weight_all_queries_on_one_key"] < 0.9


def test_smollm2_c_engine_is_healthy(c_engine, smollm2, tmp_path):
    out = run_engine(c_engine, smollm2, tmp_path / "c.lsd", prompt=SMOL_PROMPT,
                     forced=[198, 1, 520, 9531], decode=SMOL_DECODE)
    report = check_dump(out)
    assert report, report.red
    assert report.checked["attention"].records == 30 * (SMOL_DECODE + 1)


# ------------------------------------------------------------------ each bug, flagged

BUGS = {  # bug: (check, step, record)
    "softmax_no_norm": ("attention_sum", 0, "L0.att_p"),
    "zero_q": ("attention_uniform", 0, "L0.att_p"),
    "kv_pos0": ("attention_same_key", 1, "L0.att_p"),
    "rope_off": ("rope", 0, "L0.xq_rope"),
    "zero_v": ("constant", 0, "L0.xv"),
    "embd_first": ("same_rows", 0, "tok_embd"),
    "stuck": ("stuck", 2, "logits"),
    "skip_layer": ("skipped_layer", 0, "L1.out"),
    "nan_at": ("nonfinite", 0, "L1.ffn_hid"),
    "explode": ("explode", 0, "L1.out"),
}


#: with the head counts in the metadata (--hparams-meta): attention re-enacted from the dump's
#: own q, k and v. Before, these needed a reference: each value looks plausible on its own
REENACTED = {  # bug: (step, record)
    "kv_stale": (1, "L0.att"),
    "gqa_map": (0, "L0.att"),
    "no_causal_mask": (0, "L0.att"),
}


@pytest.mark.parametrize("meta", [True, False], ids=["hparams-meta", "shapes"])
@pytest.mark.parametrize("bug", [None, *REENACTED, "decode_pos", "rope_neox"], ids=str)
def test_attention_re_enacted_from_the_dumps_own_q_k_v(c_engine, tiny, tmp_path, bug, meta):
    """The C engine names its attention output its own way (``L0.att``): it is found by its
    place after q, k and v and by its values (each within v's range). The bugs in how
    attention reads its inputs are flagged there; RoPE at the wrong position or on the
    wrong pairs is not (attention does what it should with the q and k it was given). The
    head counts come from the metadata, or from q and k after RoPE kept per head."""
    out = run_engine(c_engine, tiny["gguf"], tmp_path / "c.lsd",
                     *(["--hparams-meta"] if meta else []), *(["--bug", bug] if bug else []))
    report = check_dump(out)
    assert report.checked["attention_output"].records == 2 * 5  # 2 layers, 5 steps
    first = _first_of(report.red, "attention_output")
    if bug not in REENACTED:
        assert first is None and report.checked["attention_output"].figures[
            "largest_error"] < 1e-5, first
        return
    assert first is not None, report.red
    assert (first.step, first.record) == REENACTED[bug], first
    assert first.figures["error"] > 0.1


@pytest.mark.parametrize("options, flagged", [
    ({"bug": "kv_slot"}, 1), ({"bug": "chunk_causal", "prefill_chunk": 4}, 1),
    ({"prefill_chunk": 4}, None), ({}, None)],
    ids=["kv_slot", "chunk_causal", "chunks", "bug-free"])
def test_attention_re_enacted_on_a_vllm_shaped_engine(tiny, tmp_path, options, flagged):
    """The nano engine's KV cache written to the wrong slot, and a later prefill chunk masked
    top-left, are flagged from its dump alone (its v read from qkv_proj's columns)."""
    out = tmp_path / "run.lsd"
    capture(NANO, str(out), tokens=PROMPT, decode=2, forced=FORCED[:2],
            model=str(tiny["llama"]), **options)
    report = check_dump(out)
    assert report.checked["attention_output"].records > 0
    first = _first_of(report.red, "attention_output")
    assert (first.step if first else None) == flagged, report.red


def test_attention_is_not_re_enacted_over_positions_that_do_not_follow(tiny, tmp_path):
    """Decode fed positions past the tokens before (the nano engine's decode_position): the
    keys re-enacted would not be the ones attended, so it is not judged, and it says why."""
    out = tmp_path / "run.lsd"
    capture(NANO, str(out), tokens=PROMPT, decode=2, forced=FORCED[:2],
            model=str(tiny["llama"]), bug="decode_position")
    checked = check_dump(out).checked["attention_output"]
    assert checked.records == 0 and "positions do not follow" in checked.note


def _first_of(flags: list, check: str):
    """The first red flag of ``check`` (None: none)."""
    return next((f for f in flags if f.check == check), None)


@pytest.mark.parametrize("bug", list(BUGS))
def test_bug_flagged(c_engine, tiny, tmp_path, bug):
    check, step, record = BUGS[bug]
    flags = red(run_engine(c_engine, tiny["gguf"], tmp_path / "c.lsd", "--bug", bug))
    first = _first_of(flags, check)
    assert first is not None, flags
    assert (first.step, first.record) == (step, record), first


def test_flag_details(c_engine, tiny, tmp_path):
    """Where the NaN starts, which steps are stuck, which layers never look elsewhere."""
    nan = red(run_engine(c_engine, tiny["gguf"], tmp_path / "nan.lsd", "--bug", "nan_at"))[0]
    assert nan.figures["last_finite"] == "L1.ffn_in" and nan.figures["nan"] == 1
    stuck = red(run_engine(c_engine, tiny["gguf"], tmp_path / "stuck.lsd", "--bug", "stuck"))
    assert [f.steps for f in stuck if f.check == "stuck"] == [(2, 3, 4)]
    # each step attends to the first decode step's keys, not the ones it recorded since
    assert [f.steps for f in stuck if f.check == "attention_output"] == [(2, 3, 4)]
    pos0 = red(run_engine(c_engine, tiny["gguf"], tmp_path / "pos0.lsd", "--bug", "kv_pos0"))
    assert pos0[0].figures["layers"] == [0, 1] and pos0[0].steps == (1, 2, 3, 4)
    zero = red(run_engine(c_engine, tiny["gguf"], tmp_path / "zero.lsd", "--bug", "zero_v"))
    assert {f.record for f in zero if f.check == "constant"} == {"L0.xv", "L1.xv"}


def test_step_option(c_engine, tiny, tmp_path):
    out = run_engine(c_engine, tiny["gguf"], tmp_path / "c.lsd", "--bug", "stuck")
    assert red(out, step=1) == []  # step 1 is the first decode step: nothing to repeat
    assert [f.steps for f in red(out, step=3) if f.check == "stuck"] == [(3,)]


# ------------------------------------------------------------------ statistics only

STATS_ONLY = {  # bug: (check, step, record); the decode steps run one token: abs_max is enough
    "nan_at": ("nonfinite", 0, "L1.ffn_hid"),
    "zero_v": ("constant", 0, "L0.xv"),
    "explode": ("explode", 1, "L1.out"),
    "stuck": ("stuck", 2, "logits"),
    "skip_layer": ("skipped_layer", 0, "L1.out"),
}


@pytest.mark.parametrize("bug", list(STATS_ONLY))
def test_stats_only_dump(c_engine, tiny, tmp_path, bug):
    check, step, record = STATS_ONLY[bug]
    flags = red(run_engine(c_engine, tiny["gguf"], tmp_path / "c.lsd", "--stats-over", "0",
                           "--bug", bug))
    first = _first_of(flags, check)
    assert first is not None, flags
    assert (first.step, first.record) == (step, record), first


def test_stats_only_healthy(c_engine, tiny, tmp_path):
    assert check_dump(run_engine(c_engine, tiny["gguf"], tmp_path / "c.lsd", "--stats-over",
                                 "0"))
    out = tmp_path / "hf.lsd"
    capture(f"hf:{tiny['llama']}", str(out), tokens=PROMPT, decode=3, data=False)
    report = check_dump(out)
    assert report, report.red
    assert "no attention probabilities" in report.checked["attention"].note


# ------------------------------------------------------------------ the command

def test_cli_exit_codes_and_json(c_engine, tiny, tmp_path, capsys):
    good = run_engine(c_engine, tiny["gguf"], tmp_path / "good.lsd")
    bad = run_engine(c_engine, tiny["gguf"], tmp_path / "bad.lsd", "--bug", "rope_off")
    assert main(["check", str(good), "--json", str(tmp_path / "good.json")]) == 0
    assert "no red flags" in capsys.readouterr().out
    report = json.loads((tmp_path / "good.json").read_text())
    assert report["flags"] == [] and report["red_flags"] == 0
    assert set(report["checked"]) >= {"nonfinite", "constant", "attention", "rope", "stuck"}
    assert set(report["checked"]["rope"]) == {"records", "figures", "note"}

    assert main(["check", str(bad), "--json", str(tmp_path / "bad.json")]) == 1
    out = capsys.readouterr().out
    assert "RED" in out and "L0.xq_rope" in out
    flag = json.loads((tmp_path / "bad.json").read_text())["flags"][0]
    assert set(flag) == {"check", "level", "step", "steps", "record", "seq", "message",
                         "figures"}
    assert (flag["check"], flag["level"], flag["step"], flag["record"]) == \
        ("rope", "red", 0, "L0.xq_rope")


def test_cli_bad_input(tmp_path, capsys):
    assert main(["check", str(tmp_path / "missing.lsd")]) == 2
    assert "no such dump" in capsys.readouterr().err
    broken = tmp_path / "broken.lsd"
    broken.mkdir()
    (broken / "index.jsonl").write_text("not json\n")
    assert main(["check", str(broken)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("lockstep: error:") and "Traceback" not in err


def test_cli_unknown_step(c_engine, tiny, tmp_path, capsys):
    out = run_engine(c_engine, tiny["gguf"], tmp_path / "c.lsd")
    assert main(["check", str(out), "--step", "9"]) == 2
    assert "has no step 9 (its steps: 0, 1, 2, 3, 4)" in capsys.readouterr().err


def test_a_recording_that_did_not_end_is_a_red_flag(c_engine, tiny, tmp_path):
    """The engine killed after 20 records (abort()): the dump reads, and its missing end line
    is the flag, with the last record written. It was 'no red flags'. An empty dump too."""
    import lockstep

    done = c_llama.run(c_engine, tiny["gguf"], tmp_path / "c.lsd", PROMPT, 4, FORCED,
                       "--abort-after", "20")
    assert done.returncode != 0
    (flag,) = [f for f in red(tmp_path / "c.lsd") if f.check == "ending"]
    assert (flag.step, flag.figures["records"]) == (0, 20) and "did not end" in flag.message
    with lockstep.record(tmp_path / "empty.lsd"):
        pass
    assert [f.check for f in red(tmp_path / "empty.lsd")] == ["ending"]


def test_a_mask_of_zeros_and_ones_is_not_taken_for_attention(tmp_path):
    """An engine's own float mask over the keys (0 and 1, rows summing to the keys seen),
    under a name no table knows, is not attention probabilities: no row-sum flag. Its
    softmax under a name of its own is, and a row off 1 is flagged."""
    import numpy as np

    import lockstep

    keys = 5
    visible = np.tril(np.ones((keys, keys), dtype=np.float32))
    scores = np.where(visible > 0, np.random.default_rng(0).standard_normal((keys, keys)),
                      -np.inf)
    probs = np.exp(scores - scores.max(1, keepdims=True)).astype(np.float32)
    probs /= probs.sum(1, keepdims=True)
    with lockstep.record(tmp_path / "m.lsd", meta={"prompt_token_ids": [1, 2, 3, 4, 5]}) as rec:
        with rec.step():
            rec.capture("input_ids", np.array([1, 2, 3, 4, 5]))
            rec.capture("L0.vis", visible)
            rec.capture("L0.w", probs * np.float32(0.5))  # not normalized
    flags = red(tmp_path / "m.lsd")
    assert [(f.check, f.record) for f in flags] == [("attention_sum", "L0.w")], flags
