"""Steps for engines with no module tree: ``rec.step()`` from Python, ``lockstep run
--step-at pkg.mod:func`` from the command line; a traced function that records nothing says
so."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np

import lockstep

ENGINE = '''
import dataclasses
import numpy as np
import lockstep


@dataclasses.dataclass
class State:
    x: np.ndarray


def forward(ids):
    x = np.arange(len(ids) * 4, dtype=np.float32).reshape(len(ids), 4) + sum(ids)
    lockstep.probe("h", x)
    return State(x)


def sample(state):
    return None


class Handle:  # not a dataclass: nothing inside it is seen
    def __init__(self, x):
        self.x = x


def release(handle):
    return None
'''

MAIN = '''
from vmeng import Handle, forward, release, sample
ids = [1, 2, 3]
for i in range(3):
    state = forward(ids if i == 0 else [ids[-1]])
    sample(state)
    release(Handle(state.x))
    ids.append(i)
'''


def _run(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    (tmp_path / "vmeng.py").write_text(ENGINE)
    (tmp_path / "main.py").write_text(MAIN)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [str(Path(lockstep.__file__).parents[1]), os.environ.get("PYTHONPATH", "")]))
    return subprocess.run([sys.executable, "-m", "lockstep.cli.main", "run", "--out",
                           str(tmp_path / "d.lsd"), *args, "--", "python", "main.py"],
                          capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)


def test_step_at_starts_a_step_at_each_call(tmp_path):
    done = _run(tmp_path, "--step-at", "vmeng:forward", "--trace", "vmeng:sample",
                "--trace", "vmeng:release")
    assert done.returncode == 0, done.stderr
    with lockstep.open_dump(tmp_path / "d.lsd") as dump:
        assert dump.steps == [0, 1, 2]
        # the traced sampler takes a dataclass: its field's array is recorded
        assert [(r.name, r.step, r.shape) for r in dump] == [
            (name, step, (3 if step == 0 else 1, 4)) for step in range(3)
            for name in ("h", "vmeng.sample:arg.state.x")]
        # release takes an object lockstep cannot see into and returns None: said so
        assert dump.meta["traced_without_tensors"] == ["vmeng:release"]
        traced = {t["spec"]: t for t in dump.meta["traced"]}
        assert traced["vmeng:release"]["calls"] == 3 and traced["vmeng:release"]["tensors"] == 0
        assert traced["vmeng:sample"]["tensors"] == 3
    warning = [line for line in done.stderr.splitlines() if "warning" in line]
    assert len(warning) == 1 and "vmeng:release ran 3 times and recorded no tensor" in warning[0]


def test_without_step_at_one_step(tmp_path):
    done = _run(tmp_path)
    assert done.returncode == 0, done.stderr
    with lockstep.open_dump(tmp_path / "d.lsd") as dump:
        assert dump.steps == [0]  # three forwards in one step: what --step-at is for
        assert "traced_without_tensors" not in dump.meta
    assert "warning" not in done.stderr


def test_step_at_a_function_that_does_not_exist(tmp_path):
    done = _run(tmp_path, "--step-at", "vmeng:nothing")
    assert done.returncode == 2
    assert done.stderr.startswith("lockstep: error:") and "Traceback" not in done.stderr


def test_rec_step_from_python(tmp_path):
    with lockstep.record(tmp_path / "d.lsd") as rec:
        for step in range(3):
            assert rec.step() == step  # the first call opens step 0, each later one the next
            assert rec.step() == step  # nothing recorded yet in this step: it stays open
            lockstep.probe("x", np.full((2,), step, dtype=np.float32))
    with lockstep.open_dump(tmp_path / "d.lsd") as dump:
        assert [(r.step, float(dump.read(r)[0])) for r in dump] == [(0, 0.0), (1, 1.0),
                                                                     (2, 2.0)]
