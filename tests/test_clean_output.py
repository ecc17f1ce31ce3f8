"""No third-party warning or progress bar inside lockstep's own output: transformers' cache
deprecation and its GGUF conversion bar are gone, on a first run that converts the GGUF."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

pytest.importorskip("transformers")
pytest.importorskip("gguf")


def test_first_gguf_capture_prints_only_lockstep_lines(tmp_path):
    from lockstep.demo import find_smollm2

    gguf = find_smollm2()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "LOCKSTEP_CACHE": str(tmp_path / "cache")}
    got = subprocess.run([sys.executable, "-m", "lockstep.cli.main", "capture", f"hf:{gguf}",
                          "--tokens", "504,3575,282", "--decode", "2", "--out",
                          str(tmp_path / "run.lsd")],
                         capture_output=True, text=True, env=env, timeout=600)
    assert got.returncode == 0, got.stderr
    lines = [ln for ln in (got.stdout + got.stderr).splitlines() if ln.strip()]
    assert any("converting SmolLM2-135M-Instruct.Q4_1.gguf to float32" in ln for ln in lines)
    assert all(ln.startswith("lockstep: ") for ln in lines), lines
