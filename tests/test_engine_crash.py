"""llama.cpp runs in its own process: a crash in it is one line and exit 2, the records made
before it stay readable, and the demo goes on past the section that failed.

The crash is real: the engine option ``test_crash_at_step`` makes the worker kill itself with
SIGSEGV from inside llama.cpp's graph callback, native frames on the stack."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("llama_cpp")

from lockstep.engines import open_engine
from lockstep.engines.isolated import EngineCrashed, IsolatedEngine
from lockstep.engines.llamacpp import LlamaCppEngine
from lockstep.errors import UsageError
from lockstep.store.reader import open_dump

PROMPT = "The capital of France is"
PROMPT_IDS = [504, 3575, 282, 4649, 314]


@pytest.fixture(scope="module")
def gguf() -> Path:
    from lockstep.demo import find_smollm2

    try:
        return find_smollm2()
    except Exception as exc:  # the model package is part of make setup; say so if absent
        pytest.skip(str(exc))


def lockstep_cli(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-m", "lockstep.cli.main", *args], cwd=cwd,
                          capture_output=True, text=True, env=env, timeout=900)


def test_llamacpp_runs_isolated_and_answers_as_in_process(gguf):
    spec = f"llamacpp:{gguf}"
    with open_engine(spec) as iso, LlamaCppEngine(spec, str(gguf)) as local:
        assert isinstance(iso, IsolatedEngine)
        assert iso._proc is not None and iso._proc.pid != os.getpid()
        assert iso.tokenize(PROMPT) == local.tokenize(PROMPT) == PROMPT_IDS
        assert iso.detokenize(PROMPT_IDS) == local.detokenize(PROMPT_IDS) == PROMPT
        tokens, rows = iso.decode_logits(PROMPT_IDS, 3, forced=[30, 198])
        want_tokens, want_rows = local.decode_logits(PROMPT_IDS, 3, forced=[30, 198])
        assert tokens == want_tokens
        assert rows.dtype == np.float32 and rows.shape == want_rows.shape
        np.testing.assert_array_equal(rows, want_rows)
        assert iso.meta()["quantization"] == local.meta()["quantization"]
        assert iso.meta()["process"] == "isolated"
    assert iso._proc is None  # closed: the worker is gone


def test_missing_model_is_a_usage_error_from_the_worker(tmp_path):
    engine = open_engine(f"llamacpp:{tmp_path / 'nope.gguf'}")
    with pytest.raises(UsageError, match="nope.gguf is not a file"):
        engine.load()
    engine.close()


def test_bad_option_is_refused_before_any_process_starts(gguf):
    with pytest.raises(UsageError, match="takes no option 'no_such_option'"):
        open_engine(f"llamacpp:{gguf}", no_such_option=1)


def test_crash_while_recording_is_one_line_and_keeps_earlier_steps(gguf, tmp_path):
    out = tmp_path / "cand.lsd"
    got = lockstep_cli("capture", f"llamacpp:{gguf}", "--tokens", "504,3575,282,4649,314",
                       "--decode", "3", "--out", str(out), "--opt", "test_crash_at_step=2")
    assert got.returncode == 2, got.stderr
    assert "Traceback" not in got.stderr
    errors = [ln for ln in got.stderr.splitlines() if ln.startswith("lockstep: error:")]
    assert len(errors) == 1
    assert errors[0].startswith("lockstep: error: llama.cpp crashed (SIGSEGV) at step 2 ")
    assert f"kept in {out}" in errors[0]

    shown = lockstep_cli("show", str(out))
    assert shown.returncode == 0, shown.stderr
    assert "INCOMPLETE" in shown.stdout and "crashed: llama.cpp crashed (SIGSEGV) at step 2" \
        in shown.stdout
    with open_dump(out) as dump:
        assert not dump.complete
        assert dump.meta["crashed"] == "llama.cpp crashed (SIGSEGV) at step 2"
        assert dump.steps == [0, 1]  # steps 0 and 1 were flushed whole; step 2 died unflushed
        assert dump.get(0, "input_ids").shape == (1, 5)
        logits = dump.read(dump.get(1, "result_output"))
        assert logits.shape[-1] == 49152 and np.isfinite(logits).all()


def test_diff_with_a_crashing_candidate_keeps_the_reference(gguf, tmp_path):
    ref = tmp_path / "ref.lsd"
    ok = lockstep_cli("capture", f"llamacpp:{gguf}", "--prompt", PROMPT, "--decode", "2",
                      "--out", str(ref))
    assert ok.returncode == 0, ok.stderr
    got = lockstep_cli("diff", f"dump:{ref}", f"llamacpp:{gguf}", "--out", str(tmp_path / "d"),
                       "--cand-opt", "test_crash_at_step=1", "--json", str(tmp_path / "r.json"))
    assert got.returncode == 2
    assert "Traceback" not in got.stderr
    assert "lockstep: error: llama.cpp crashed (SIGSEGV) at step 1" in got.stderr
    assert not (tmp_path / "r.json").exists()  # no report claims anything about a dead run
    with open_dump(ref) as dump:
        assert dump.complete and dump.steps == [0, 1, 2]
    with open_dump(tmp_path / "d" / "candidate.lsd") as cand:
        assert cand.steps == [0] and "crashed" in cand.meta


def test_crash_exception_names_signal_step_and_dump(gguf, tmp_path):
    out = tmp_path / "c.lsd"
    engine = open_engine(f"llamacpp:{gguf}", test_crash_at_step=0)
    engine.load()
    with pytest.raises(EngineCrashed) as info:
        engine.record_run(out, {"engine": "llama.cpp"}, PROMPT_IDS, 1)
    assert info.value.signal_name == "SIGSEGV" and info.value.step == 0
    assert info.value.dump == str(out)
    engine.close()  # the worker is gone: closing is a no-op, not an error
    with open_dump(out) as dump:
        assert dump.records == [] or all(r.step == 0 for r in dump.records)
        assert "crashed" in dump.meta


def test_demo_goes_on_past_a_crashed_section(gguf, tmp_path):
    pytest.importorskip("transformers")
    pytest.importorskip("gguf")
    got = lockstep_cli("demo", "--skip", "zoo", "--skip", "generate", "--out",
                       str(tmp_path / "demo"), "--llamacpp-opt", "test_crash_at_step=1")
    assert got.returncode == 2, got.stdout[-2000:] + got.stderr[-2000:]
    out = " ".join(got.stdout.split())  # rich wraps long lines
    assert "demo section 'llamacpp' failed: llama.cpp crashed (SIGSEGV) at step 1" in out
    after = out.split("demo section 'llamacpp' failed", 1)[1]
    assert "candidate: the same model in bfloat16" in after and "DRIFT" in after
    assert "DIVERGED" in after
    assert "llamacpp (failed, expected drift)" in out
    assert "Traceback" not in got.stderr
    assert "Warning" not in got.stderr and "Warning" not in got.stdout


def test_generate_with_a_crashing_candidate_is_one_line(gguf, tmp_path):
    got = lockstep_cli("generate", f"llamacpp:{gguf}", f"llamacpp:{gguf}", "--prompt", PROMPT,
                       "--max-new-tokens", "3", "--cand-opt", "test_crash_at_step=1",
                       "--out", str(tmp_path / "g"))
    assert got.returncode == 2, got.stdout[-2000:] + got.stderr[-2000:]
    assert "Traceback" not in got.stderr
    errors = [ln for ln in got.stderr.splitlines() if ln.startswith("lockstep: error:")]
    assert len(errors) == 1
    assert errors[0].startswith("lockstep: error: llama.cpp crashed (SIGSEGV) while decoding")
