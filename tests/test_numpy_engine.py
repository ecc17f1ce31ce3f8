"""A numpy engine writing its dump with DumpWriter, as a C engine would, against
transformers with no mapping file: its own names, flat activations, logits named ``logits``."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

import lockstep
from engines.numpy_engine import NumpyLlama
from lockstep.workflows.capture import capture
from models import save_tiny

PROMPT = [3, 17, 42, 7, 99, 5, 64, 11, 200]
DECODE = 3


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, list[int]]:
    root = tmp_path_factory.mktemp("numpy-engine")
    model = save_tiny("llama", root / "llama")
    ref = root / "ref.lsd"
    tokens = capture(f"hf:{model}", str(ref), tokens=PROMPT, decode=DECODE)
    return model, ref, tokens


def run(model: Path, out: Path, tokens: list[int], bug: str | None = None) -> list[int]:
    return NumpyLlama(model, bug=bug).generate(out, PROMPT, DECODE, forced=tokens[:DECODE])


def test_bug_free_matches(tmp_path, reference):
    model, ref, tokens = reference
    assert run(model, tmp_path / "np.lsd", tokens) == tokens
    with lockstep.open_dump(tmp_path / "np.lsd") as dump:
        assert dump.complete and dump.steps == [0, 1, 2, 3]
        assert dump.meta["engine"] == "numpy-llama"
    result = lockstep.compare(ref, tmp_path / "np.lsd")
    assert result.verdict == "match", (result.first_divergence, result.coverage)
    by_ref = {(p.step, p.ref_name): p for p in result.results}
    # its own names, paired with no mapping file, at every step
    for step in range(DECODE + 1):
        assert by_ref[(step, "lm_head")].cand_name == "logits"
        assert by_ref[(step, "model.norm")].cand_name == "norm"
        assert by_ref[(step, "model.layers.1.mlp.down_proj:input.0")].cand_name == "l1.act"
        assert by_ref[(step, "model.layers.0.self_attn.rope:0")].cand_name == "l0.q_rot"
    assert not result.cand_only
    assert all(p.error < 1e-4 for p in result.results)


@pytest.mark.parametrize("bug, step, ref_name, kind", [
    ("transposed_lm_head", 0, "lm_head", "logits"),
    ("rope_base", 0, "model.layers.0.self_attn.rope:0", "rope"),
    # re-enacted from the reference's own gate and up projections
    ("gelu", 0, "model.layers.0.mlp.down_proj:input.0", "act"),
    # attention re-enacted from the reference's q, k and v with the scale 1/head_dim
    ("scale_by_dim", 0, "model.layers.0.self_attn.o_proj:input.0", "scale"),
])
def test_bug_localized(tmp_path, reference, bug, step, ref_name, kind):
    model, ref, tokens = reference
    run(model, tmp_path / "np.lsd", tokens, bug=bug)
    result = lockstep.compare(ref, tmp_path / "np.lsd")
    first = result.first_divergence
    assert result.verdict == "diverged"
    assert first is not None and (first.step, first.ref_name) == (step, ref_name), first
    assert result.diagnosis is not None and result.diagnosis.kind == kind, result.diagnosis


def test_from_the_command_line(tmp_path, reference):
    model, ref, tokens = reference
    run(model, tmp_path / "np.lsd", tokens, bug="transposed_lm_head")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [str(Path(lockstep.__file__).parents[1]), os.environ.get("PYTHONPATH", "")]))
    done = subprocess.run([sys.executable, "-m", "lockstep.cli.main", "compare", str(ref),
                           str(tmp_path / "np.lsd")], capture_output=True, text=True, env=env,
                          timeout=300)
    assert done.returncode == 1, done.stdout + done.stderr
    assert "DIVERGED" in done.stdout and "logits" in done.stdout


class _NoNorms(NumpyLlama):
    """The engine with a hand-kept tag list that leaves its layer norms out: nothing it
    records stands for the residual between attention and the MLP."""

    def _put(self, name, x):
        return x if name.endswith((".norm1", ".norm2")) else super()._put(name, x)


def test_a_partial_tag_list_is_never_paired_with_the_wrong_residual(tmp_path, reference):
    """Without its norms, the layer output ``l0.out`` agrees by cosine (0.98) with the
    reference's residual before the MLP as well as (1.0) with the layer's output. Both read
    as agreeing by cosine; the pair whose values are the same wins. It was paired with the
    residual before: DIVERGED, relative error 0.18, on an engine with no bug."""
    model, ref, tokens = reference
    _NoNorms(model).generate(tmp_path / "np.lsd", PROMPT, DECODE, forced=tokens[:DECODE])
    result = lockstep.compare(ref, tmp_path / "np.lsd")
    assert result.verdict != "diverged", result.first_divergence
    by_ref = {(p.step, p.ref_name): p for p in result.results}
    for step in range(DECODE + 1):
        assert by_ref[(step, "model.layers.0")].cand_name == "l0.out"
        assert (step, "model.layers.0.post_attention_layernorm:input.0") not in by_ref
    assert all(p.error < 1e-4 for p in result.results)
