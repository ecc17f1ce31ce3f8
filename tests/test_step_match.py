"""Steps are matched by what was fed (ids, then positions), not by call count: a candidate that
runs a warm-up forward first is compared step for step, and the realignment is reported; a
candidate fed wrong ids at every step is still compared by index (and diverges)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

import lockstep  # noqa: E402
from lockstep.align.steps import match_steps  # noqa: E402
from lockstep.compare import compare  # noqa: E402
from lockstep.engines import open_engine  # noqa: E402
from lockstep.store import DumpWriter  # noqa: E402
from lockstep.store.reader import open_dump  # noqa: E402
from lockstep.workflows.capture import capture  # noqa: E402
from models import save_tiny  # noqa: E402

IDS = [3, 17, 42, 7, 99]


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("steps")
    model = save_tiny("llama", root / "llama")
    capture(f"hf:{model}", str(root / "ref.lsd"), tokens=IDS, decode=2)
    engine = open_engine(f"zoo:{model}")
    engine.load()
    try:
        meta = {**engine.meta(), "prompt_token_ids": IDS}
        with lockstep.record(root / "warm.lsd", meta=meta) as rec:
            engine.generate(rec, [1, 2, 3], 0)  # a warm-up forward on other ids
            engine.generate(rec, IDS, 2)
        with lockstep.record(root / "short.lsd", meta=meta) as rec:
            engine.generate(rec, IDS, 1)  # one decode step fewer
    finally:
        engine.close()
    return {"ref": root / "ref.lsd", "warm": root / "warm.lsd", "short": root / "short.lsd"}


def test_a_warm_up_step_is_left_out_and_the_rest_realigned(runs):
    result = compare(runs["ref"], runs["warm"])
    m = result.step_match
    assert m.method == "fed" and m.realigned
    assert m.pairs == ((0, 1), (1, 2), (2, 3)) and m.cand_left_out == (0,)
    assert (m.ref_steps, m.cand_steps) == (3, 4)
    assert result.verdict == "match"  # by index, step 0 against the warm-up would diverge
    assert result.candidate.steps == (0, 1, 2, 3)  # the candidate as it was recorded
    assert {p.step for p in result.results} == {0, 1, 2}


def test_step_counts_that_differ_are_reported_and_never_match(runs, tmp_path):
    result = compare(runs["ref"], runs["short"])
    m = result.step_match
    assert (m.ref_steps, m.cand_steps) == (3, 2) and m.method == "index"
    assert m.noteworthy and "the candidate 2" in m.describe()
    assert result.verdict == "incomplete"  # the reference's last step was never compared
    got = subprocess.run([sys.executable, "-m", "lockstep.cli.main", "compare",
                          str(runs["ref"]), str(runs["warm"]), "--json",
                          str(tmp_path / "c.json")], capture_output=True, text=True,
                         env={**os.environ, "COLUMNS": "200"}, timeout=300)
    assert got.returncode == 0, got.stderr
    assert "candidate steps left out (fed ids the reference never was): 0" in got.stdout
    data = json.loads((tmp_path / "c.json").read_text())["step_match"]
    assert data["method"] == "fed" and data["candidate_left_out"] == [0]
    assert {"reference": 0, "candidate": 1} in data["pairs"]


def _dump(path: Path, fed: list[tuple[list[int], list[int]]]) -> Path:
    import numpy as np

    w = DumpWriter(path, {"engine": "test"})
    for step, (ids, pos) in enumerate(fed):
        for name, values in (("input_ids", ids), ("positions", pos)):
            arr = np.asarray(values, dtype=np.int64)
            w.write(name, step, "int64", arr.shape, arr.tobytes(), role="input")
    w.close()
    return path


def test_positions_choose_between_steps_fed_the_same_ids(tmp_path):
    ref = _dump(tmp_path / "r.lsd", [([5, 6], [0, 1]), ([7], [2])])
    # a warm-up fed the prompt's ids at other positions, then the real run
    cand = _dump(tmp_path / "c.lsd", [([5, 6], [4, 5]), ([5, 6], [0, 1]), ([7], [2])])
    with open_dump(ref) as r, open_dump(cand) as c:
        m = match_steps(r, c)
    assert m.pairs == ((0, 1), (1, 2)) and m.cand_left_out == (0,)


def test_wrong_ids_at_every_step_are_still_compared_by_index(tmp_path):
    ref = _dump(tmp_path / "r.lsd", [([5, 6], [0, 1]), ([7], [2])])
    swapped = _dump(tmp_path / "c.lsd", [([0, 1], [5, 6]), ([2], [7])])  # ids and positions
    with open_dump(ref) as r, open_dump(swapped) as c:
        m = match_steps(r, c)
    assert m.method == "index" and not m.realigned and m.pairs == ((0, 0), (1, 1))
    result = compare(ref, swapped)
    assert result.verdict == "diverged" and result.first_divergence.step == 0
