"""A precision a dump declares (``quantization``, a lower ``compute_dtype``) is taken as noise
only where the comparison measured it (compare/precision.py): a declaration alone never turns
a bug into drift.

The candidates are tiny transformers Llamas recorded as engines record them, with the
metadata an engine writes: computing in float32 while declaring quantized weights or
bfloat16, or with every linear's operands really rounded to bfloat16 and float32 results
(tests/engines/precision.py's kernels), which the declaration must still cover.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

import lockstep
from engines.precision import bf16_linears
from models import PROMPT, tiny

pytestmark = pytest.mark.usefixtures("one_thread")


def _record(model: Any, path: Path, **meta: Any) -> Path:
    with lockstep.record(path, meta={"prompt_token_ids": PROMPT, **meta}) as rec:
        rec.watch(model)
        with torch.no_grad():
            model(torch.tensor([PROMPT]))
    return path


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _record(tiny("llama"), tmp_path_factory.mktemp("declared") / "ref.lsd")


def _scaled(scale: float) -> Any:
    """The tiny Llama with layer 1's down_proj weight times ``scale``: an error entering at
    model.layers.1.mlp.down_proj, everything before it exact."""
    model = tiny("llama")
    with torch.no_grad():
        model.model.layers[1].mlp.down_proj.weight.mul_(scale)
    return model


@pytest.mark.parametrize("meta", [{"quantization": "Q4_1"}, {"compute_dtype": "bfloat16"}],
                         ids=["quantization", "compute_dtype"])
def test_a_declared_precision_does_not_hide_an_error_after_an_exact_first_layer(
        tmp_path, reference, meta):
    """3% introduced in layer 1 by a candidate that computes in float32 and says otherwise.
    Before: DRIFT ('errors stay bounded and grow smoothly'), the declared Q4_1 (or bfloat16)
    allowing 5% (3%) as noise; layer 0 agreed exactly, which no such precision does."""
    cand = _record(_scaled(1.03), tmp_path / "cand.lsd", **meta)
    result = lockstep.compare(reference, cand)
    first = result.first_divergence
    assert result.verdict == "diverged", result.precision
    assert first is not None and first.ref_name == "model.layers.1.mlp.down_proj", first
    assert 1e-2 < first.error < 3e-2  # within the noise the declaration would allow
    check = result.precision
    assert check is not None and check.steps == (0,)
    assert check.declared == {"candidate": {k: str(v) for k, v in meta.items()}}
    assert check.why.startswith("every tensor of layer 0 agrees"), check.why
    assert result.diagnosis is not None and result.diagnosis.kind == "op"


def test_a_declared_precision_that_is_measured_still_counts(tmp_path, reference):
    """Every linear with bfloat16 operands and float32 results (stored float32), declared as
    bfloat16: the noise shows from layer 0's first projection on, so it is drift. Without
    the declaration the same run is a divergence at that projection: the declaration is what
    lets it pass, and it was measured."""
    model = bf16_linears(tiny("llama"), torch.bfloat16)
    declared = lockstep.compare(reference, _record(model, tmp_path / "bf16.lsd",
                                                   compute_dtype="bfloat16"))
    assert declared.verdict == "drift", (declared.first_divergence, declared.precision)
    assert declared.precision is None
    silent = lockstep.compare(reference, _record(model, tmp_path / "silent.lsd"))
    assert silent.verdict == "diverged"
    assert silent.first_divergence is not None and \
        silent.first_divergence.ref_name.startswith("model.layers.0.self_attn.")


def test_the_report_says_why_a_declaration_was_not_taken(tmp_path, reference):
    """The terminal report and the JSON say what was declared and what was measured."""
    cand = _record(_scaled(1.03), tmp_path / "cand.lsd", quantization="Q4_1")
    done = subprocess.run([sys.executable, "-m", "lockstep", "compare", str(reference),
                           str(cand), "--json", str(tmp_path / "r.json")],
                          capture_output=True, text=True)
    assert done.returncode == 1, done.stderr
    text = " ".join(done.stdout.split())
    assert "precision: the candidate declares quantization Q4_1, but every tensor of layer 0 " \
           "agrees" in text.replace("│ ", ""), done.stdout
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["precision"]["declared"] == {"candidate": {"quantization": "Q4_1"}}
    assert report["precision"]["steps"] == [0]
    assert report["verdict"] == "diverged"
