"""A pair's alternatives include another call of the same module: an engine whose norm is
called twice per layer (once for the residual sum, once for the normed output) is paired by
values with its second call at every layer and step, not reported DIVERGED; a bug in that
call is still found where it is."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from lockstep.compare import compare
from lockstep.store import DumpWriter

RNG = np.random.default_rng(0)
W = RNG.standard_normal((16, 24)).astype(np.float32)
HIDDEN = [RNG.standard_normal((2, 16)).astype(np.float32),
          RNG.standard_normal((1, 16)).astype(np.float32)]


def _write(path: Path, *, twice: bool, scale_layer: int | None = None) -> Path:
    w = DumpWriter(path, {"engine": "test"})
    for step, h in enumerate(HIDDEN):
        ids = np.array([5, 6] if step == 0 else [7], dtype=np.int64)
        w.write("input_ids", step, "int64", ids.shape, ids.tobytes(), role="input")
        for i in range(3):
            x = np.tanh(h + i).astype(np.float32)
            if twice:
                residual = (h * 3 + 1 + i).astype(np.float32)
                w.write(f"model.layers.{i}.norm", step, "float32", x.shape,
                        residual.tobytes(), call=0)
                out = x * np.float32(1.1) if i == scale_layer else x
                w.write(f"model.layers.{i}.norm", step, "float32", x.shape, out.tobytes(),
                        call=1)
            else:
                w.write(f"model.layers.{i}.norm", step, "float32", x.shape, x.tobytes())
            y = (x @ W).astype(np.float32)
            w.write(f"model.layers.{i}.mlp", step, "float32", y.shape, y.tobytes())
    w.close()
    return path


def test_the_second_call_is_paired_by_values_at_every_layer_and_step(tmp_path):
    ref = _write(tmp_path / "r.lsd", twice=False)
    cand = _write(tmp_path / "c.lsd", twice=True)
    result = compare(ref, cand)
    assert result.verdict == "match"
    norms = [p for p in result.results if p.ref_name.endswith(".norm")]
    assert len(norms) == 6 and all(p.error == 0.0 for p in norms)
    by_seq = {r.seq: r for r in result.cand_only}
    assert all(r.call == 0 for r in by_seq.values())  # the residual sums stay unpaired
    assert len(by_seq) == 6


def test_a_bug_in_that_call_is_found_at_its_layer(tmp_path):
    ref = _write(tmp_path / "r.lsd", twice=False)
    cand = _write(tmp_path / "c.lsd", twice=True, scale_layer=1)
    result = compare(ref, cand)
    assert result.verdict == "diverged"
    first = result.first_divergence
    assert (first.step, first.ref_name) == (0, "model.layers.1.norm")
    assert abs(first.error - 0.1) < 1e-5  # the 10% scale, not a residual sum's error
