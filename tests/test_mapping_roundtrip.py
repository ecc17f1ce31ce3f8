"""``align --write FILE`` writes a mapping file that ``compare --mapping FILE`` takes unedited
and that gives the verdict the automatic pairing gave, on engines against transformers: the
zoo's engine (``zoo:``), the module-less decode VM, a numpy engine whose per-head attention
record is (heads, tokens, dim) at prefill and (heads, dim) at decode. What stays unpaired
after the mapping is listed."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

import lockstep
from lockstep.align.mapping import load_mapping
from lockstep.workflows.capture import capture
from models import save_tiny

PROMPT = [3, 17, 42, 7, 99, 5, 64, 11, 200]
DECODE = 3


pytestmark = pytest.mark.usefixtures("one_thread")


def _cli(*args: Any) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, COLUMNS="200", PYTHONPATH=os.pathsep.join(
        [str(Path(lockstep.__file__).parents[1]), os.environ.get("PYTHONPATH", "")]))
    return subprocess.run([sys.executable, "-m", "lockstep.cli.main", *map(str, args)],
                          capture_output=True, text=True, env=env, timeout=300)


def _record(engine: str, model: Path, out: Path, tokens: list[int]) -> None:
    if engine == "zoo":
        capture(f"zoo:{model}", str(out), tokens=PROMPT, decode=DECODE, forced=tokens[:DECODE])
    elif engine == "decode-vm":
        from engines.decode_vm import DecodeVM

        with lockstep.record(out, meta={"engine": "decode-vm"}) as rec:
            DecodeVM(model).generate(rec, PROMPT, DECODE, forced=tokens[:DECODE])
    else:
        from engines.numpy_engine import NumpyLlama

        NumpyLlama(model, heads_first=True).generate(out, PROMPT, DECODE,
                                                     forced=tokens[:DECODE])


@pytest.mark.parametrize("engine, family", [("zoo", "qwen3"), ("decode-vm", "qwen3"),
                                            ("numpy", "llama")])
def test_written_mapping_is_taken_unedited(tmp_path, engine, family):
    model = save_tiny(family, tmp_path / family)
    ref, cand = tmp_path / "ref.lsd", tmp_path / "cand.lsd"
    tokens = capture(f"hf:{model}", str(ref), tokens=PROMPT, decode=DECODE)
    _record(engine, model, cand, tokens)
    done = _cli("align", ref, cand, "--write", tmp_path / "map.toml")
    assert done.returncode == 0, done.stdout + done.stderr
    text = (tmp_path / "map.toml").read_text()
    # one rule per pair of names: a rule's transform applies at every step
    rules = re.findall(r"^cand = (.*)\nref = (.*)$", text, re.M)
    assert rules and len(rules) == len(set(rules)), text

    done = _cli("compare", ref, cand, "--mapping", tmp_path / "map.toml",
                "--json", tmp_path / "r.json")
    assert done.returncode == 0, done.stdout + done.stderr
    assert "MATCH" in done.stdout
    automatic = lockstep.compare(ref, cand)
    mapped = lockstep.compare(ref, cand, mapping=load_mapping(tmp_path / "map.toml"))
    assert automatic.verdict == mapped.verdict == "match"
    # what nothing paired stays unpaired and is listed, in the report as in the file
    assert {c.name for c in mapped.cand_only} == {c.name for c in automatic.cand_only}
    if engine == "numpy":  # the per-head attention record: a copy nothing pairs
        assert {c.name for c in mapped.cand_only} == {"l0.attn_heads", "l1.attn_heads"}
        assert "# 'l*.attn_heads'," in text
        report = json.loads((tmp_path / "r.json").read_text())
        assert "l0.attn_heads" in json.dumps(report)
