"""Recording never breaks the recorded program: empty tensors of any rank are recorded,
dtypes a dump cannot hold are refused with a UsageError naming the record (explicit
capture) or skipped, noted in the dump and reported once (hooks, traces, probes)."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

import lockstep
from lockstep.errors import UsageError
from lockstep.store import DumpWriter, open_dump

EMPTY = {"torch (3, 0)": torch.zeros(3, 0), "torch (0, 0, 5)": torch.zeros(0, 0, 5),
         "numpy (0, 3)": np.zeros((0, 3), np.float32), "bf16 (2, 0)": torch.zeros(
             2, 0, dtype=torch.bfloat16)}


@pytest.mark.parametrize("case", list(EMPTY))
def test_empty_tensors_of_any_rank_are_recorded(tmp_path, case):
    value = EMPTY[case]
    for stats in (False, True):  # written on the engine's thread, or queued with statistics
        path = tmp_path / f"d{stats}"
        with lockstep.record(path, stats=stats) as rec:
            rec.capture("e", value)
        with open_dump(path) as dump:
            rec = dump.records[0]
            assert rec.shape == tuple(value.shape) and dump.read(rec).shape == rec.shape
            assert dump.stats(rec)["nan"] == 0


def test_writer_takes_an_empty_multidimensional_buffer(tmp_path):
    w = DumpWriter(tmp_path / "d")
    w.write("e", 0, "float32", (3, 0), memoryview(np.zeros((3, 0), np.float32)))
    w.close()
    with open_dump(tmp_path / "d") as dump:
        assert dump.read(dump.records[0]).shape == (3, 0)


class Slicer(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = torch.nn.Linear(4, 4)

    def forward(self, x):
        y = self.lin(x)
        lockstep.probe("fnuz", y.to(torch.float8_e4m3fnuz))
        lockstep.probe("on_meta", torch.empty(2, device="meta"))
        return {"empty": y[:, :0], "kept": y, "odd\ud800": y}


def test_a_watched_model_never_raises_because_of_the_recorder(tmp_path, capfd):
    model = Slicer()
    with lockstep.record(tmp_path / "d") as rec:
        rec.watch(model)
        for _ in range(3):
            out = model(torch.ones(3, 4))
    assert out["empty"].shape == (3, 0)
    err = capfd.readouterr().err
    warnings = [ln for ln in err.splitlines() if ln.startswith("lockstep: warning:")]
    assert len(warnings) == 1 and "fnuz" in warnings[0] and "skipped" in warnings[0]
    with open_dump(tmp_path / "d") as dump:
        names = {r.name for r in dump}
        assert {":empty", ":kept", "lin"} <= names and "fnuz" not in names
        assert dump.get(2, ":empty").shape == (3, 0)
        skipped = dump.meta["skipped"]
        assert skipped["count"] == 9  # three a step, three steps
        assert [s["name"] for s in skipped["records"]] == ["fnuz", "on_meta", ":odd\\ud800"]


@pytest.mark.parametrize("value,words", [
    (torch.ones(2).to(torch.float8_e4m3fnuz), "float8_e4m3fnuz"),
    (torch.empty(2, device="meta"), "meta-device"),
    (torch.ones(2, dtype=torch.complex64), "complex64"),
    (np.array(["a"]), "numpy dtype <U1"),
])
def test_explicit_capture_refuses_with_the_record_name(tmp_path, value, words):
    with lockstep.record(tmp_path / "d") as rec:
        with pytest.raises(UsageError, match=f"cannot record 'my.rec'.*{words}"):
            rec.capture("my.rec", value)


def test_writer_refuses_a_name_with_a_lone_surrogate(tmp_path):
    w = DumpWriter(tmp_path / "d")
    with pytest.raises(UsageError, match="lone surrogate"):
        w.write("x\ud800", 0, "float32", (1,), np.ones(1, np.float32).tobytes())
    with pytest.raises(UsageError, match="lone surrogate"):
        w.add_meta(model="m\udcff")
    w.close()
    with open_dump(tmp_path / "d") as dump:
        assert len(dump) == 0 and dump.complete


def test_big_endian_numpy_is_stored_little_endian(tmp_path):
    with lockstep.record(tmp_path / "d") as rec:
        rec.capture("be", np.arange(4, dtype=">f4"))
        rec.capture("bei", np.arange(3, dtype=">i8"))
    with open_dump(tmp_path / "d") as dump:
        assert dump.read(dump.get(0, "be")).tolist() == [0.0, 1.0, 2.0, 3.0]
        assert dump.get(0, "bei").dtype == "int64"
        assert dump.read(dump.get(0, "bei")).tolist() == [0.0, 1.0, 2.0]


def test_lockstep_run_of_a_model_returning_an_empty_slice(tmp_path):
    prog = tmp_path / "prog.py"
    prog.write_text(textwrap.dedent("""
        import torch
        class M(torch.nn.Module):
            def forward(self, x):
                return x[:, :0]
        print("shape", tuple(M()(torch.ones(3, 4)).shape))
    """))
    res = subprocess.run([sys.executable, "-m", "lockstep.cli.main", "run", "--out",
                          str(tmp_path / "d"), "--", "python", str(prog)],
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert "shape (3, 0)" in res.stdout and "Traceback" not in res.stderr
    with open_dump(tmp_path / "d") as dump:
        assert dump.get(0, "").shape == (3, 0)


def test_bytes_are_taken_as_the_tensor_means_them(tmp_path):
    """The recorder reads a CPU tensor's memory directly: a lazily negated view, a slice
    with a storage offset, a transposed (non-contiguous) view and 2-byte and bool dtypes all
    read back as their values."""
    x = torch.arange(12, dtype=torch.float32).reshape(3, 4)
    cases = {"neg": torch._neg_view(x), "offset": x[1:], "transposed": x.t(),
             "bf16": x.to(torch.bfloat16), "bool": x > 5, "half": x.half()[:, 1:]}
    with lockstep.record(tmp_path / "d") as rec:
        for name, t in cases.items():
            rec.capture(name, t)
    with open_dump(tmp_path / "d") as dump:
        for rec in dump:
            want = cases[rec.name].resolve_neg().float().numpy()
            assert np.array_equal(dump.read(rec), want), rec.name
