"""A short run of the input fuzzer (benchmarks/fuzz_inputs.py): seeded random corruptions of
dumps and checkpoints, each through the real CLI in a process of its own; every case must
exit 0, 1 or 2 within 20 s with no traceback. The long run: python benchmarks/fuzz_inputs.py
--cases 1000."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "fuzz_inputs.py"


def _fuzzer():
    spec = importlib.util.spec_from_file_location("fuzz_inputs", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["fuzz_inputs"] = module
    spec.loader.exec_module(module)
    return module


def test_sixty_seeded_corruptions_exit_cleanly(tmp_path):
    pytest.importorskip("safetensors")
    fuzz = _fuzzer()
    results = fuzz.fuzz(60, seed=0, jobs=2, timeout=20.0, root=tmp_path)
    failed = [f"case {r.case.n} ({r.case.what}): lockstep {' '.join(r.case.argv)} -> "
              f"{r.code}\n{r.stderr[-1500:]}" for r in results if not r.ok]
    assert not failed, "\n".join(failed)
    assert len(results) == 60
    kinds = {r.case.what.split(":")[0] for r in results}
    assert {"dump", "safetensors", "shards", "adapter", "bin"} <= kinds
    assert {r.code for r in results} >= {0, 2}  # both readable and refused inputs were made


def test_the_cases_are_seeded(tmp_path):
    fuzz = _fuzzer()
    bases = fuzz.make_bases(tmp_path / "bases")
    first, second = (tmp_path / "a", tmp_path / "b")
    first.mkdir()
    second.mkdir()
    made = [[fuzz.make_case(n, 7, bases, root).what for n in range(20)]
            for root in (first, second)]
    assert made[0] == made[1]


def test_no_mutation_writes_through_a_link(tmp_path):
    """A case's file replaced by a link to a file outside (the fuzzer also links to
    /etc/passwd) is never written through: every mutation leaves the outside file as it was.
    The fuzzer runs as root on CI machines; a write through the link once emptied
    /etc/passwd."""
    fuzz = _fuzzer()
    outside = tmp_path / "outside.json"
    outside.write_text('{"keep": 1}\n')
    single = tmp_path / "single.safetensors"
    single.symlink_to(outside)
    folder = tmp_path / "folder"
    folder.mkdir()
    for name in ("index.jsonl", "model.safetensors.index.json", "adapter_config.json",
                 "model.safetensors"):
        (folder / name).symlink_to(outside)
    mutations = (fuzz.truncate, fuzz.flip_bytes, fuzz.non_utf8, fuzz.edit_index_line,
                 fuzz.edit_json_file, fuzz.shard_name, fuzz.empty_dir)
    import random

    for seed in range(20):
        for mutate in mutations:
            for case in (single, folder):
                mutate(random.Random(seed), case)
    assert outside.read_text() == '{"keep": 1}\n'
