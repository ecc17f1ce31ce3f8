"""Replay, the dual test, on engines shaped like real ones: mixed-precision linears (bf16 or
fp16 operands, float32 results, records that say float32) drift, explained by measurement; a
1% weight error is introduced at its op; a layer-0 bug is introduced there and inherited by
the later layers."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from lockstep.report.json_report import report_dict  # noqa: E402
from lockstep.workflows.diff import diff  # noqa: E402
from models import save_tiny  # noqa: E402

ENGINE = str(Path(__file__).parent / "engines" / "precision.py")
TOKENS = [3, 17, 42, 7, 99, 5, 64, 11, 200]


@pytest.fixture(scope="module")
def llama(tmp_path_factory) -> Path:
    return save_tiny("llama", tmp_path_factory.mktemp("replay") / "llama")


def _diff(llama: Path, out: Path, **options):
    return diff(f"hf:{llama}", f"py:{ENGINE}:PrecisionEngine", out, tokens=TOKENS, decode=2,
                cand_options={"model": str(llama), **options})


def test_no_replay_says_diverged_for_bf16_operands(llama, tmp_path):
    """What lockstep said before it measured: float32 records, float32 tolerances."""
    result = diff(f"hf:{llama}", f"py:{ENGINE}:PrecisionEngine", tmp_path, tokens=TOKENS,
                  decode=2, cand_options={"model": str(llama), "operands": "bfloat16"},
                  replay=False)
    assert result.verdict == "diverged" and result.replay is None


@pytest.mark.parametrize("operands", ["bfloat16", "float16"])
def test_mixed_precision_linears_drift_explained_by_replay(llama, tmp_path, operands):
    result = _diff(llama, tmp_path, operands=operands)
    assert result.verdict == "drift", result.first_divergence
    replay = result.replay
    assert replay is not None and replay.precision == operands
    first = replay.first
    assert first.reference.endswith("q_proj") and first.where == "introduced"
    assert first.explained_by == operands
    assert first.introduced <= 2 * first.rounding[operands]
    assert first.inherited < 1e-6  # its input, the float32 norm, agreed
    data = report_dict(result)
    assert data["verdict"] == "drift" and data["replay"]["precision"] == operands
    json.dumps(data)


def test_one_percent_weight_error_is_introduced_at_its_op(llama, tmp_path):
    result = _diff(llama, tmp_path, o_proj_scale=1.01)
    assert result.verdict == "diverged"
    first = result.first_divergence
    assert first.ref_name == "model.layers.0.self_attn.o_proj"
    op = result.replay.first
    assert op.reference == "model.layers.0.self_attn.o_proj"
    assert op.where == "introduced" and op.explained_by is None
    assert op.introduced == pytest.approx(first.error, rel=0.05)
    assert op.input_record == "model.layers.0.self_attn.o_proj:input.0"
    assert result.replay.precision is None
    # the other way: the candidate's own o_proj on the reference's input is 1% off by itself
    assert op.reverse == pytest.approx(0.01, rel=0.05), op.reverse_note


def test_layer0_bug_introduced_there_and_inherited_later(llama, tmp_path):
    result = _diff(llama, tmp_path, up_scale=1.05)
    assert result.verdict == "diverged"
    ops = result.replay.ops
    assert ops[0].reference == "model.layers.0.mlp.up_proj" and ops[0].where == "introduced"
    later = [op for op in ops[1:] if op.where is not None]
    assert later, [(op.reference, op.note) for op in ops]
    assert all(op.where == "inherited" for op in later), [
        (op.reference, op.introduced, op.total) for op in later]
    assert any(".layers.1." in op.reference for op in later)
    # the other way: the candidate's up_proj is wrong on the reference's input too, and its
    # later ops, fed the reference's inputs, agree with the reference's: only layer 0 is broken
    assert ops[0].reverse == pytest.approx(0.05, rel=0.05), ops[0].reverse_note
    assert all(op.reverse is not None and op.reverse < 1e-5 for op in later), [
        (op.reference, op.reverse, op.reverse_note) for op in later]


def test_generate_holds_an_undeclared_float32_engine_to_its_measured_precision(llama):
    """A decode-position bug gives a decode KL of a few 1e-3: under the loose limit for an
    unknown precision, but the prefill agrees to float32 level, so the float32 limit holds."""
    from lockstep.generation import check_generation
    from lockstep.generation.prompts import Prompt

    prompt = Prompt(tokens=tuple(TOKENS))
    spec = f"py:{Path(__file__).parent / 'engines' / 'undeclared.py'}:Undeclared"
    bad = check_generation(f"hf:{llama}", spec, [prompt], max_new_tokens=4,
                           cand_options={"model": str(llama), "bug": "wrong_decode_position"},
                           localize=False)
    check = bad.prompts[0].decode_check
    assert check.prefill_kl < 1e-7 and check.limit < 1e-6
    assert check.broken and check.kl > check.limit
    good = check_generation(f"hf:{llama}", spec, [prompt], max_new_tokens=4,
                            cand_options={"model": str(llama)}, localize=False)
    assert not good.prompts[0].decode_check.broken


def test_replay_command_on_recorded_dumps(llama, tmp_path):
    import os
    import subprocess
    import sys

    _diff(llama, tmp_path, o_proj_scale=1.01)  # leaves reference.lsd and candidate.lsd
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "COLUMNS": "80"}

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "lockstep.cli.main", "replay",
                               f"hf:{llama}", str(tmp_path / "reference.lsd"),
                               str(tmp_path / "candidate.lsd"), *args],
                              capture_output=True, text=True, env=env, timeout=300)

    got = cli("--at", "model.layers.0.mlp.down_proj", "--json", str(tmp_path / "r.json"))
    assert got.returncode == 1, got.stderr  # still diverged: replay only adds the dual test
    data = json.loads((tmp_path / "r.json").read_text())
    assert data["replay"]["ops"][0]["reference"] == "model.layers.0.mlp.down_proj"
    assert data["replay"]["ops"][0]["where"] == "inherited"
    assert "replay (the dual test)" in got.stdout
    # at 80 columns each op's name and figures are whole, not squeezed into a table
    assert "│ step 0  model.layers.0.mlp.down_proj  inherited" in got.stdout, got.stdout
    assert "error " in got.stdout and "its input's error " in got.stdout
    assert "…" not in got.stdout.split("replay (the dual test)")[1].split("╰")[0]
    bad = cli("--at", "no.such.record")
    assert bad.returncode == 2 and "no compared pair has that reference name" in bad.stderr


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_whole_model_in_lower_precision_still_drifts_and_replay_never_aborts(llama, tmp_path,
                                                                             dtype):
    """The first pairs over tolerance include the rotary embedding (called with positions):
    replay says it cannot run it alone, and goes on."""
    result = diff(f"hf:{llama}", f"hf:{llama}", tmp_path, tokens=TOKENS, decode=2,
                  cand_options={"dtype": dtype})
    assert result.verdict == "drift"
    notes = [op.note for op in result.replay.ops if op.note]
    assert any("not its input alone" in n for n in notes), notes
    assert any(op.where is not None for op in result.replay.ops)
