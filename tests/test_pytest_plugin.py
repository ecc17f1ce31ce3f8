"""The pytest plugin, run through pytester in a fresh pytest process: a passing engine, a
failing one (a zoo bug) whose failure message is lockstep's report, golden dumps and their
refresh flag, and the dtype matrix."""

from __future__ import annotations

import pytest

pytest.importorskip("transformers")
pytest_plugins = ["pytester"]

CONFTEST = '''
import pytest, torch
from transformers import LlamaConfig, LlamaForCausalLM


@pytest.fixture(scope="session")
def tiny(tmp_path_factory):
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("m") / "llama"
    LlamaForCausalLM(LlamaConfig(
        vocab_size=320, hidden_size=128, intermediate_size=176, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
    )).save_pretrained(path)
    return path
'''

ENGINE_TESTS = '''
TOKENS = [3, 17, 42, 7, 99]


def test_engine_agrees(lockstep, tiny):
    outcome = lockstep.diff(f"hf:{tiny}", f"zoo:{tiny}", tokens=TOKENS, decode=2)
    outcome.assert_ok()
    assert outcome.verdict in ("match", "drift")


def test_engine_with_a_kv_slot_bug(lockstep, tiny):
    lockstep.diff(f"hf:{tiny}", f"zoo:{tiny}", tokens=TOKENS, decode=2,
                  cand_options={"bug": "wrong_kv_slot"}).assert_ok()
'''


def test_passing_and_failing_engine(pytester):
    pytester.makeconftest(CONFTEST)
    pytester.makepyfile(ENGINE_TESTS)
    result = pytester.runpytest_subprocess("-q", "-p", "no:cacheprovider")
    result.assert_outcomes(passed=1, failed=1)
    result.stdout.fnmatch_lines(["*AssertionError: lockstep: DIVERGED*",
                                 "*DIVERGED*", "*first divergence*"])
    assert "test_engine_with_a_kv_slot_bug" in result.stdout.str()


GOLDEN_TESTS = '''
import os
TOKENS = [3, 17, 42, 7, 99]


def test_against_golden(lockstep, tiny):
    golden = lockstep.golden("tiny-llama", f"hf:{tiny}", tokens=TOKENS, decode=2)
    bug = os.environ.get("ZOO_BUG")
    lockstep.diff(golden, f"zoo:{tiny}", cand_options={"bug": bug} if bug else None
                  ).assert_ok()
'''


def test_golden_dumps_and_the_refresh_flag(pytester, monkeypatch):
    pytester.makeconftest(CONFTEST)
    pytester.makepyfile(GOLDEN_TESTS)
    golden = pytester.path / "lockstep-golden" / "tiny-llama.lsd"

    missing = pytester.runpytest_subprocess("-q", "-p", "no:cacheprovider")
    missing.assert_outcomes(failed=1)
    missing.stdout.fnmatch_lines(["*golden dump*does not exist*--lockstep-update*"])
    assert not golden.exists()

    made = pytester.runpytest_subprocess("-q", "-p", "no:cacheprovider", "--lockstep-update")
    made.assert_outcomes(passed=1)
    assert (golden / "index.jsonl").is_file()
    size = sum(p.stat().st_size for p in golden.iterdir())
    assert size < 64 * 1024  # statistics only: kilobytes, not the tensors
    stamp = (golden / "index.jsonl").stat().st_mtime_ns

    again = pytester.runpytest_subprocess("-q", "-p", "no:cacheprovider")
    again.assert_outcomes(passed=1)
    assert (golden / "index.jsonl").stat().st_mtime_ns == stamp  # not re-recorded

    monkeypatch.setenv("ZOO_BUG", "norm_unit_offset")
    broken = pytester.runpytest_subprocess("-q", "-p", "no:cacheprovider")
    broken.assert_outcomes(failed=1)
    broken.stdout.fnmatch_lines(["*lockstep: DIVERGED*"])


def test_golden_keeps_the_layers_and_names_asked_for(pytester):
    pytester.makeconftest(CONFTEST)
    pytester.makepyfile('''
import lockstep as ls


def test_small_golden(lockstep, tiny):
    spec = lockstep.golden("layer-0", f"hf:{tiny}", tokens=[3, 17, 42], layers=[0],
                           exclude=["*.mlp.act_fn"])
    with ls.open_dump(spec.removeprefix("dump:")) as dump:
        names = {r.name for r in dump}
    assert any(n.startswith("model.layers.0.") for n in names)
    assert not any(n.startswith("model.layers.1.") for n in names)  # not asked for
    assert "lm_head" in names  # records of no layer are kept
    assert not any(n.endswith("mlp.act_fn") for n in names)
''')
    made = pytester.runpytest_subprocess("-q", "-p", "no:cacheprovider", "--lockstep-update")
    made.assert_outcomes(passed=1)


def test_dtype_matrix(pytester):
    pytester.makepyfile('''
def test_each_dtype(lockstep_dtype, lockstep_backend):
    assert lockstep_backend == "cpu"
    assert lockstep_dtype in ("float32", "bfloat16")
''')
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "-v",
                                           "--lockstep-dtypes", "float32,bfloat16")
    result.assert_outcomes(passed=2)
    result.stdout.fnmatch_lines(["*test_each_dtype?float32-cpu? PASSED*",
                                 "*test_each_dtype?bfloat16-cpu? PASSED*"])
