"""The dump store against its specification (docs/format.md).

Round trips for every dtype, a dump from an independent writer that knows only the spec, the
exact bytes our writer produces, crash safety of a killed recording, and the one-line error
for every kind of broken dump (from ``open_dump`` and from the CLI).
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

import lockstep
from lockstep.compare.comparison import DumpSummary
from lockstep.errors import DumpError, UsageError
from lockstep.store import DTYPES, DumpWriter, open_dump

sys.path.insert(0, str(Path(__file__).resolve().parent))
from independent_writer import IndependentWriter, bf16_bits, e4m3fn_byte, stats_of
from killing import kill_after

ROOT = Path(__file__).resolve().parents[1]
FORMAT_MD = ROOT / "docs" / "format.md"
_CLI = Path(sys.executable).with_name("lockstep")
CLI = [str(_CLI)] if _CLI.exists() else [sys.executable, "-m", "lockstep.cli.main"]

# The dtype table of docs/format.md: name -> bytes per element.
SPEC_DTYPES = {
    "float64": 8, "float32": 4, "float16": 2, "bfloat16": 2, "float8_e4m3fn": 1,
    "float8_e5m2": 1, "int64": 8, "int32": 4, "int16": 2, "int8": 1, "uint64": 8,
    "uint32": 4, "uint16": 2, "uint8": 1, "bool": 1,
}
WIDE = {"float64", "int64", "uint64", "int32", "uint32"}  # read() gives float64 for these


def _tdtype(name: str) -> torch.dtype:
    return getattr(torch, name)


def _raw_bytes(t: torch.Tensor) -> bytes:
    return t.contiguous().view(torch.uint8).numpy().tobytes()


def _sample(name: str) -> torch.Tensor:
    """Twelve interesting values of ``name``, shape (3, 4)."""
    if DTYPES[name].is_float:
        vals = [0.0, -0.0, 1.0, -1.5, 3.140625, 1e-3, -2.0 ** -9, 0.3, 240.0, math.inf,
                -math.inf, math.nan]
        t = torch.tensor(vals, dtype=torch.float64).to(_tdtype(name))
    elif name == "bool":
        t = torch.tensor([i % 3 == 0 for i in range(12)])
    else:
        info = torch.iinfo(_tdtype(name))
        vals = [0, 1, 2, 3, 7, 100, 42, 5, info.max, info.max - 1, info.min, info.min + 1]
        t = torch.tensor(vals, dtype=_tdtype(name))
    return t.reshape(3, 4)


def _expected_float(t: torch.Tensor, name: str) -> np.ndarray:
    """torch's own conversion of ``t`` to the float type lockstep reads it as."""
    return t.to(torch.float64 if name in WIDE else torch.float32).numpy()


def _assert_same_floats(got: np.ndarray, want: np.ndarray) -> None:
    assert got.dtype == want.dtype and got.shape == want.shape
    np.testing.assert_array_equal(got, want)  # NaN equals NaN here
    np.testing.assert_array_equal(np.signbit(got), np.signbit(want))  # -0.0 stays -0.0


# -- (a) round trips -------------------------------------------------------------------------
def test_dtype_table_matches_the_spec():
    assert {n: d.itemsize for n, d in DTYPES.items()} == SPEC_DTYPES


@pytest.mark.parametrize("name", sorted(SPEC_DTYPES))
def test_round_trip_through_writer_and_reader(tmp_path, name):
    t = _sample(name)
    raw = _raw_bytes(t)
    w = DumpWriter(tmp_path / "d")
    w.write("lead", 0, "int8", (1,), b"\x05")  # so the record under test is not at offset 0
    w.write(f"t.{name}", 3, name, tuple(t.shape), raw, None, call=2)
    w.close()
    with open_dump(tmp_path / "d") as dump:
        rec = dump.get(3, f"t.{name}", 2)
        assert rec is not None and rec.dtype == name and rec.shape == (3, 4)
        assert rec.offset == 64 and rec.nbytes == 12 * SPEC_DTYPES[name] == len(raw)
        assert dump.raw(rec).tobytes() == raw
        _assert_same_floats(dump.read(rec), _expected_float(t, name))


@pytest.mark.parametrize("name,bits", [("bfloat16", 16), ("float8_e4m3fn", 8),
                                       ("float8_e5m2", 8)])
def test_every_bit_pattern_decodes_like_torch(tmp_path, name, bits):
    codes = np.arange(1 << bits, dtype=np.uint16 if bits == 16 else np.uint8)
    t = torch.from_numpy(codes.view(np.int16) if bits == 16 else codes).view(_tdtype(name))
    w = DumpWriter(tmp_path / "d")
    w.write("all", 0, name, (1 << bits,), _raw_bytes(t))
    w.close()
    with open_dump(tmp_path / "d") as dump:
        got = dump.read(dump.records[0])
    want = t.to(torch.float32).numpy()
    nan = np.isnan(want)
    np.testing.assert_array_equal(np.isnan(got), nan)
    np.testing.assert_array_equal(got[~nan].view(np.uint32), want[~nan].view(np.uint32))


@pytest.mark.parametrize("name", sorted(SPEC_DTYPES))
def test_round_trip_through_probe(tmp_path, name):
    t = _sample(name)
    with lockstep.record(tmp_path / "d") as rec:
        lockstep.probe("x", t)
        rec.next_step()
        lockstep.probe("pair", (t[0], {"k": t[1:]}))
    with open_dump(tmp_path / "d") as dump:
        assert [(r.step, r.name, r.dtype, r.shape) for r in dump] == [
            (0, "x", name, (3, 4)), (1, "pair:0", name, (4,)), (1, "pair:1.k", name, (2, 4))]
        assert all(r.offset % 64 == 0 and r.extra == {"role": "probe"} for r in dump)
        assert dump.raw(dump.records[0]).tobytes() == _raw_bytes(t)
        _assert_same_floats(dump.read(dump.records[2]), _expected_float(t[1:], name))
        stats = dump.stats(dump.records[0])  # computed from the data: not stored by default
        assert dump.records[0].stats is None
        assert set(stats) == {"min", "max", "mean", "std", "abs_max", "nan", "inf", "zero"}
        finite = t.to(torch.float64).numpy()  # stats are over the values as float64-exact
        nan = int(np.isnan(finite).sum())
        inf = int(np.isinf(finite).sum())
        finite = finite[np.isfinite(finite)]
        assert (stats["nan"], stats["inf"]) == (nan, inf)
        assert stats["zero"] == int((finite == 0).sum())
        assert stats["min"] == finite.min() and stats["max"] == finite.max()
        assert stats["abs_max"] == np.abs(finite).max()


# -- (b) a dump from a writer that only knows the spec ---------------------------------------
F32 = [1.0, -2.5, 0.1, 3.0e38, -0.0, 7.25]
F16 = [0.5, -65504.0, 1.0e-4]
BF16 = [0.1, -3.3, 1.0e30, 2.0 ** -130, 1.00390625, 1.01171875]  # incl. round-to-even ties
I64 = [0, -1, 2 ** 62 + 1, -(2 ** 63), 2 ** 63 - 1, 32000]
FP8 = [0.0, -0.0, 1.0, -2.25, 0.3, 448.0, 1000.0, 2.0 ** -9, 0.0009, 1.0625, 1.1875, -3.3]


def _write_independent(path: Path, *, align: int = 1) -> None:
    w = IndependentWriter(str(path), meta={"engine": "indep", "model": "tiny",
                                           "vocab_size": 7}, align=align)
    w.tensor("model.layers.0.mlp", 0, "float16", [3], F16)  # 6 bytes: the next offset is 6
    w.tensor("model.embed_tokens", 0, "float32", [2, 3], F32)
    w.tensor("model.norm", 0, "bfloat16", [3, 2], BF16)
    w.tensor("model.norm", 0, "bfloat16", [3, 2], BF16, call=1, truncate_bf16=True)
    w.tensor("input_ids", 0, "int64", [1, 6], I64, role="input")
    w.tensor("q", 0, "float8_e4m3fn", [12], FP8)
    w.meta(model="tiny-v2", prompt_token_ids=[1, 2, 3])
    w.tensor("model.embed_tokens", 1, "float32", [2, 3], F32)
    w.tensor("model.norm", 1, "bfloat16", [3, 2], BF16, data=False)
    w.end(error="RuntimeError: boom")


def test_independent_encoders_agree_with_torch():
    rng = np.random.default_rng(0)
    vals = (rng.standard_normal(3000) * 10.0 ** rng.integers(-6, 6, 3000)).astype(np.float32)
    vals = np.concatenate([vals, np.float32([0.0, -0.0, 448.0, -448.0, 2.0 ** -9, 1.0625])])
    bf16 = np.array([bf16_bits(float(v)) for v in vals], np.uint16)
    want = torch.from_numpy(vals).to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
    np.testing.assert_array_equal(bf16, want)
    small = vals[np.abs(vals) <= 448]
    fp8 = np.array([e4m3fn_byte(float(v)) for v in small], np.uint8)
    want = torch.from_numpy(small).to(torch.float8_e4m3fn).view(torch.uint8).numpy()
    np.testing.assert_array_equal(fp8, want)


def test_independent_writer_dump_reads_back(tmp_path):
    _write_independent(tmp_path / "ind")
    with open_dump(tmp_path / "ind") as dump:
        assert dump.complete and dump.error == "RuntimeError: boom"
        assert dump.steps == [0, 1] and len(dump) == 8
        assert dump.meta == {"engine": "indep", "model": "tiny-v2", "vocab_size": 7,
                             "prompt_token_ids": [1, 2, 3]}
        offsets = [r.offset for r in dump]
        assert offsets[:3] == [0, 6, 30] and offsets[-1] is None  # unaligned, as allowed
        f16, f32, bf16, bf16t, ids, fp8, f32b, stats_only = dump.records

        np.testing.assert_array_equal(dump.read(f16), torch.tensor(F16).half().float().numpy())
        want32 = torch.tensor(F32, dtype=torch.float32).reshape(2, 3).numpy()
        np.testing.assert_array_equal(dump.read(f32), want32)
        np.testing.assert_array_equal(dump.read(f32b), want32)
        want_bf = torch.tensor(BF16).to(torch.bfloat16).float().reshape(3, 2).numpy()
        np.testing.assert_array_equal(dump.read(bf16), want_bf)
        trunc = (np.array(BF16, np.float32).view(np.uint32) & 0xFFFF0000).view(np.float32)
        np.testing.assert_array_equal(dump.read(bf16t), trunc.reshape(3, 2))
        assert bf16t.call == 1 and dump.get(0, "model.norm", 1) is bf16t
        assert dump.raw(ids).tolist() == [I64] and ids.extra == {"role": "input"}
        assert dump.read(ids).dtype == np.float64
        fp8_want = torch.tensor(FP8).to(torch.float8_e4m3fn).float().numpy()
        _assert_same_floats(dump.read(fp8), fp8_want)

        assert not stats_only.has_data and stats_only.nbytes is None
        assert stats_only.stats == stats_of(dump.read(bf16).ravel().tolist())
        assert f32.stats["abs_max"] == float(np.float32(3.0e38)) and f32.stats["zero"] == 1


def test_independent_dump_matches_the_same_tensors_written_by_lockstep(tmp_path):
    _write_independent(tmp_path / "ind", align=1)
    with lockstep.record(tmp_path / "ours") as rec:
        lockstep.probe("model.layers.0.mlp", torch.tensor(F16, dtype=torch.float16))
        lockstep.probe("model.embed_tokens", torch.tensor(F32).reshape(2, 3))
        norm = torch.tensor(BF16).to(torch.bfloat16).reshape(3, 2)
        lockstep.probe("model.norm", norm)
        top = (np.array(BF16, np.float32).view(np.uint32) >> 16).astype(np.uint16)
        lockstep.probe("model.norm", torch.from_numpy(top.view(np.int16)).view(
            torch.bfloat16).reshape(3, 2))
        lockstep.probe("input_ids", torch.tensor([I64]))
        lockstep.probe("q", torch.tensor(FP8).to(torch.float8_e4m3fn))
        rec.next_step()
        lockstep.probe("model.embed_tokens", torch.tensor(F32).reshape(2, 3))
        lockstep.probe("model.norm", norm)
    result = lockstep.compare(tmp_path / "ours", tmp_path / "ind")
    assert not result.ref_only and not result.cand_only
    assert len(result.results) == 8 and all(p.how == "name" for p in result.results)
    with_data = [p for p in result.results if p.note is None]
    assert len(with_data) == 7 and all(p.error == 0.0 for p in with_data)
    # the one stats-only pair, the final norm at step 1, has no std to compare (its 1e30
    # values overflow float32): the final norm is decisive, so lockstep cannot say match
    assert result.verdict == "incomplete"
    assert [(g.what, g.records) for g in result.coverage.gaps] == [
        ("final_norm", ("model.norm@1 (incomparable: statistics only (no data recorded))",))]


def test_torn_last_line_from_independent_writer(tmp_path):
    w = IndependentWriter(str(tmp_path / "d"))
    w.tensor("a", 0, "float32", [2], [1.0, 2.0])
    w.abandon()
    with open(tmp_path / "d" / "index.jsonl", "ab") as f:
        f.write(b'{"type":"tensor","name":"b","step":0,"se')
    with open_dump(tmp_path / "d") as dump:
        assert not dump.complete and dump.error is None
        assert [r.name for r in dump] == ["a"]
        assert dump.read(dump.records[0]).tolist() == [1.0, 2.0]


def _doc_block(start: str, end: str = "```") -> str:
    text = FORMAT_MD.read_text(encoding="utf-8")
    i = text.index(start)
    return text[i:text.index(end, i)]


def test_python_example_in_the_spec_writes_a_valid_dump(tmp_path):
    script = tmp_path / "write_dump.py"
    script.write_text(_doc_block("# write_dump.py"))
    subprocess.run([sys.executable, str(script), str(tmp_path / "py")], check=True, timeout=30)
    with open_dump(tmp_path / "py") as dump:
        assert dump.complete and dump.steps == [0, 1] and len(dump) == 4
        norm = dump.get(1, "model.norm")
        want = (torch.tensor([[1.0, 2, 3], [4, 5, 6]], dtype=torch.float64) * 0.1 + 1)
        want = want.float().to(torch.bfloat16).float().numpy()  # float64 -> float32 -> bf16
        np.testing.assert_array_equal(dump.read(norm), want)


def test_c_example_in_the_spec_writes_the_same_dump(tmp_path):
    cc = shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")
    if cc is None:
        pytest.skip("no C compiler")
    src = tmp_path / "write_dump.c"
    src.write_text(_doc_block("/* write_dump.c"))
    subprocess.run([cc, "-std=c99", "-Wall", "-Werror", "-o", str(tmp_path / "w"), str(src)],
                   check=True, timeout=60)
    subprocess.run([str(tmp_path / "w"), str(tmp_path / "c")], check=True, timeout=30)
    script = tmp_path / "write_dump.py"
    script.write_text(_doc_block("# write_dump.py"))
    subprocess.run([sys.executable, str(script), str(tmp_path / "py")], check=True, timeout=30)
    with open_dump(tmp_path / "c") as c, open_dump(tmp_path / "py") as py:
        assert c.complete and [r.key for r in c] == [r.key for r in py]
        for rc, rp in zip(c, py):
            assert (rc.dtype, rc.shape) == (rp.dtype, rp.shape)
            assert c.raw(rc).tobytes() == py.raw(rp).tobytes()


# -- (c) the exact bytes our writer produces -------------------------------------------------
def test_writer_bytes_are_exactly_as_specified(tmp_path):
    stats = {"min": -2.0, "max": 1.0, "mean": -0.5, "std": 1.5, "abs_max": 2.0,
             "nan": 0, "inf": 0, "zero": 0}
    a = np.array([1.0, 2.0, 3.0], "<f4").tobytes()
    b = np.array([1.0, -2.0], "<f2").tobytes()
    c = np.array(-5, "<i8").tobytes()
    w = DumpWriter(tmp_path / "d", meta={"engine": "x"})
    assert w.write("a", 0, "float32", (3,), a) == 0
    assert w.write("b", 0, "float16", (2,), b, stats, call=1, role="output", rank=None) == 1
    assert w.write("c", 1, "int64", (), None, None) == 2
    w.add_meta(model="m")
    assert w.write("", 1, "int64", (), c, None) == 3
    w.close()
    index = (tmp_path / "d" / "index.jsonl").read_bytes()
    assert index == (
        b'{"type":"header","format":"lockstep-dump","version":1,"meta":{"engine":"x"}}\n'
        b'{"type":"tensor","name":"a","step":0,"seq":0,"call":0,"dtype":"float32",'
        b'"shape":[3],"offset":0,"nbytes":12,"stats":null}\n'
        b'{"type":"tensor","name":"b","step":0,"seq":1,"call":1,"dtype":"float16",'
        b'"shape":[2],"offset":64,"nbytes":4,"stats":{"min":-2.0,"max":1.0,"mean":-0.5,'
        b'"std":1.5,"abs_max":2.0,"nan":0,"inf":0,"zero":0},"role":"output"}\n'
        b'{"type":"tensor","name":"c","step":1,"seq":2,"call":0,"dtype":"int64",'
        b'"shape":[],"offset":null,"nbytes":null,"stats":null}\n'
        b'{"type":"meta","meta":{"model":"m"}}\n'
        b'{"type":"tensor","name":"","step":1,"seq":3,"call":0,"dtype":"int64",'
        b'"shape":[],"offset":128,"nbytes":8,"stats":null}\n'
        b'{"type":"end","records":4}\n'
    )
    data = (tmp_path / "d" / "data.bin").read_bytes()
    assert data == a + b"\0" * 52 + b + b"\0" * 60 + c
    with open_dump(tmp_path / "d") as dump:
        assert dump.read(dump.get(1, "")).tolist() == -5.0
        assert dump.meta == {"engine": "x", "model": "m"}


def test_recorder_header_prefix_and_alignment(tmp_path):
    with lockstep.record(tmp_path / "d", meta={"engine": "e"}) as rec:
        for n in (1, 3, 70, 5):
            lockstep.probe(f"x{n}", torch.ones(n, dtype=torch.float16))
        rec.add_meta(vocab_size=11)
    first = (tmp_path / "d" / "index.jsonl").read_bytes().split(b"\n")[0]
    assert first.startswith(b'{"type":"header","format":"lockstep-dump","version":1,'
                            b'"meta":{"lockstep_version":"' + lockstep.__version__.encode())
    header = json.loads(first)
    assert header["meta"]["engine"] == "e" and header["meta"]["stats_only"] is False
    with open_dump(tmp_path / "d") as dump:
        assert [r.offset for r in dump] == [0, 64, 128, 320]
        assert dump.meta["vocab_size"] == 11 and dump.end == {"type": "end", "records": 4}


def test_writer_refuses_bad_input(tmp_path):
    w = DumpWriter(tmp_path / "d")
    with pytest.raises(UsageError, match="float12"):
        w.write("x", 0, "float12", (1,), b"\0")
    with pytest.raises(ValueError, match="3 bytes"):
        w.write("x", 0, "float32", (1,), b"\0\0\0")
    w.close()
    with pytest.raises(UsageError, match="not empty"):
        DumpWriter(tmp_path / "d")
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "keep.txt").write_text("mine")
    with pytest.raises(UsageError, match="not a lockstep dump"):
        DumpWriter(tmp_path / "other", overwrite=True)
    assert (tmp_path / "other" / "keep.txt").exists()


# -- (d) crash safety ------------------------------------------------------------------------
_CHILD = textwrap.dedent("""
    import sys, time
    import torch
    import lockstep

    class Tiny(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(4, 3)
            self.act = torch.nn.ReLU()

        def forward(self, x):
            return self.act(self.lin(x))

    torch.manual_seed(0)
    model = Tiny()
    with torch.no_grad(), lockstep.record(sys.argv[1], meta={"engine": "tiny"}) as rec:
        rec.watch(model)
        for step in range(1000):
            model(torch.arange(8, dtype=torch.float32).reshape(2, 4) - step)
            print(f"step {step} done", flush=True)
            if step >= 2:
                time.sleep(60)  # the test kills us here
""")


def _tiny_expected(step: int) -> dict[str, np.ndarray]:
    torch.manual_seed(0)
    lin = torch.nn.Linear(4, 3)
    with torch.no_grad():
        y = lin(torch.arange(8, dtype=torch.float32).reshape(2, 4) - step)
    return {"lin": y.numpy(), "act": torch.relu(y).numpy(), "": torch.relu(y).numpy()}


def test_killed_recording_is_readable_and_comparable(tmp_path):
    script = tmp_path / "child.py"
    script.write_text(_CHILD)
    out = tmp_path / "killed"
    lines = kill_after(script, out, "step 2 done")
    assert lines == ["step 0 done", "step 1 done", "step 2 done"]
    assert b'"type":"end"' not in (out / "index.jsonl").read_bytes()

    with open_dump(out) as dump:
        assert dump.complete is False and dump.end is None and dump.error is None
        assert dump.steps == [0, 1, 2]
        assert dump.meta["engine"] == "tiny"
        for step in range(3):
            got = [(r.name, r.call) for r in dump.in_step(step)]
            assert got == [("lin", 0), ("act", 0), ("", 0)]
            for name, want in _tiny_expected(step).items():
                np.testing.assert_array_equal(dump.read(dump.get(step, name)), want)
        result = lockstep.compare(dump, dump)
        assert DumpSummary.of(dump).complete is False
    assert result.verdict == "match" and len(result.results) == 9
    assert result.reference.complete is False and result.candidate.complete is False
    assert result.reference.steps == (0, 1, 2)
    assert lockstep.compare(str(out), str(out)).candidate.complete is False
    cli = subprocess.run([str(Path(sys.executable).with_name("lockstep")), "compare", str(out),
                          str(out)], capture_output=True, text=True, env={"COLUMNS": "200"})
    assert cli.returncode == 0, cli.stderr
    assert "INCOMPLETE" in cli.stdout and "MATCH" in cli.stdout


def test_dump_killed_mid_step_is_readable(tmp_path):
    """What a SIGKILL leaves is what the writer has handed to the OS: copy the directory while
    the writer is still open, with no flush. Every index line on disk must point at data on
    disk, so the copy opens, as an incomplete dump, with correct values."""
    w = DumpWriter(tmp_path / "live")
    for i in range(400):
        w.write(f"model.layers.{i}.mlp", 0, "float32", (4,),
                np.full(4, i, np.float32).tobytes(),
                {"min": i, "max": i, "mean": i, "std": 0.0, "abs_max": i, "nan": 0, "inf": 0,
                 "zero": 0})
        if i % 37 == 0:
            shutil.copytree(tmp_path / "live", tmp_path / f"killed{i}")
            with open_dump(tmp_path / f"killed{i}") as dump:
                assert not dump.complete
                for j, rec in enumerate(dump):
                    assert rec.name == f"model.layers.{j}.mlp"
                    assert dump.read(rec).tolist() == [float(j)] * 4
    w.close()


# -- (e) broken dumps: one line, naming the dump and the record -------------------------------
def _good_dump(path: Path) -> Path:
    """Lines: 1 header, 2-5 records seq 0-3 (offsets 0, 64, 128, 192; 16 bytes each), 6 end."""
    w = DumpWriter(path, meta={"engine": "good"})
    for seq, (step, name) in enumerate([(0, "a"), (0, "b"), (1, "a"), (1, "b")]):
        w.write(name, step, "float32", (4,), np.full(4, seq, np.float32).tobytes())
    w.close()
    return path


def _edit_line(path: Path, lineno: int, change) -> None:
    index = path / "index.jsonl"
    lines = index.read_text().split("\n")
    lines[lineno - 1] = change(lines[lineno - 1])
    index.write_text("\n".join(lines))


def _set_field(field, value):
    def change(line):
        obj = json.loads(line)
        obj[field] = value
        return json.dumps(obj)
    return change


def _truncate_data(p: Path) -> None:
    with open(p / "data.bin", "r+b") as f:
        f.truncate(100)  # seq 1 (64+16) still fits, seq 2 (128+16) does not


def _empty_dir(p: Path) -> None:
    shutil.rmtree(p)
    p.mkdir()


# case -> (how to break the good dump, words in the message, record seq, index line)
BROKEN = {
    "truncated data.bin": (_truncate_data, ["past the end", "data.bin"], 2, 4),
    "non-JSON line in the middle": (
        lambda p: _edit_line(p, 3, lambda line: line[:40]), ["not valid JSON"], None, 3),
    "offset past the end": (
        lambda p: _edit_line(p, 4, _set_field("offset", 10 ** 9)), ["past the end"], 2, 4),
    "unknown dtype": (
        lambda p: _edit_line(p, 3, _set_field("dtype", "float12")), ["float12"], 1, 3),
    "absurd shape": (
        lambda p: _edit_line(p, 5, _set_field("shape", [2 ** 31] * 3)), ["absurd shape"], 3, 5),
    "missing index.jsonl": (
        lambda p: (p / "index.jsonl").unlink(), ["index.jsonl is missing"], None, None),
    "empty directory": (_empty_dir, ["index.jsonl is missing"], None, None),
    "no such directory": (shutil.rmtree, ["does not exist"], None, None),
}


def _broken(tmp_path: Path, case: str) -> Path:
    bad = _good_dump(tmp_path / "bad")
    BROKEN[case][0](bad)
    return bad


@pytest.mark.parametrize("case", list(BROKEN))
def test_open_dump_rejects_broken_dump(tmp_path, case):
    bad = _broken(tmp_path, case)
    _, words, seq, line = BROKEN[case]
    with pytest.raises(DumpError) as info:
        open_dump(bad)
    msg = str(info.value)
    assert "\n" not in msg and msg.startswith(str(bad))
    assert Path(info.value.path) == bad and info.value.record == seq
    for word in words:
        assert word in msg
    if seq is not None:
        assert f"record {seq}:" in msg
    if line is not None:
        assert f"index.jsonl line {line}" in msg


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([*CLI, *args], capture_output=True, text=True, timeout=60,
                          env={**os.environ, "COLUMNS": "200"})


@pytest.mark.parametrize("case", list(BROKEN))
def test_cli_compare_rejects_broken_dump(tmp_path, case):
    bad = _broken(tmp_path, case)
    good = _good_dump(tmp_path / "good")
    _, words, seq, line = BROKEN[case]
    for args in ([str(bad), str(good)], [str(good), str(bad)]):
        res = _cli("compare", *args)
        assert res.returncode == 2, (res.stdout, res.stderr)
        assert "Traceback" not in res.stderr + res.stdout
        lines = res.stderr.splitlines()
        assert len(lines) == 1, res.stderr
        assert str(bad) in lines[0]
        for word in words:
            assert word in lines[0]
        if line is not None:
            assert f"line {line}" in lines[0]


def test_cli_compare_of_good_dumps_exits_zero(tmp_path):
    good = _good_dump(tmp_path / "good")
    res = _cli("compare", str(good), str(good))
    assert res.returncode == 0, res.stderr
    assert "Traceback" not in res.stderr


# -- reader rules from the spec --------------------------------------------------------------
HEADER = '{"type":"header","format":"lockstep-dump","version":1}'


def _tensor(**over) -> str:
    obj = {"type": "tensor", "name": "x", "step": 0, "seq": 0, "dtype": "float32",
           "shape": [1], "offset": 0, "nbytes": 4}
    obj.update(over)
    return json.dumps({k: v for k, v in obj.items() if v != "DROP"})


def _dump_from_text(path: Path, index: str, data: bytes = b"\0\0\x80\x3f") -> Path:
    path.mkdir()
    (path / "index.jsonl").write_text(index)
    (path / "data.bin").write_bytes(data)
    return path


READER_ACCEPTS = {
    "minimal, no end line": (HEADER + "\n" + _tensor() + "\n", False),
    "blank lines and an end line": (HEADER + "\n\n" + _tensor() + "\n  \n"
                                    '{"type":"end","records":1}\n', True),
    "end line without a newline is torn": (HEADER + "\n" + _tensor() + "\n"
                                           '{"type":"end","records":1}', False),
    "call null, no stats, extra fields": (HEADER + "\n" + _tensor(call=None, stats="DROP",
                                                                 rank=3, foo={"a": 1}) + "\n",
                                          False),
    "stats-only with no offset keys": (HEADER + "\n" + _tensor(offset="DROP", nbytes="DROP",
                                                               shape=[10 ** 6]) + "\n", False),
    "header meta null": ('{"type":"header","format":"lockstep-dump","version":1,"meta":null}\n'
                         + _tensor() + "\n", False),
}


@pytest.mark.parametrize("case", list(READER_ACCEPTS))
def test_reader_accepts(tmp_path, case):
    index, complete = READER_ACCEPTS[case]
    with open_dump(_dump_from_text(tmp_path / "d", index) / "index.jsonl") as dump:
        assert dump.complete is complete and len(dump) == 1
        rec = dump.records[0]
        if rec.has_data:
            assert dump.read(rec).tolist() == [1.0]


READER_REJECTS = {
    "empty index": ("", "is empty"),
    "torn header only": ('{"type":"header","format":"lock', "is empty"),
    "no header": (_tensor() + "\n", "line 1: not a lockstep dump"),
    "wrong format": ('{"type":"header","format":"other","version":1}\n', "not a lockstep dump"),
    "newer version": ('{"type":"header","format":"lockstep-dump","version":2}\n', "newer"),
    "not an object": (HEADER + "\n[1,2]\n", "line 2 is not a JSON object"),
    "unknown line type": (HEADER + '\n{"type":"tensors"}\n', "unknown line type 'tensors'"),
    "bad meta": (HEADER + '\n{"type":"meta","meta":[1]}\n', "line 2: a meta line needs"),
    "bool step": (HEADER + "\n" + _tensor(step=True) + "\n", "'step' must be a non-negative"),
    "missing seq": (HEADER + "\n" + _tensor(seq="DROP") + "\n", "'seq' must be"),
    "negative offset": (HEADER + "\n" + _tensor(offset=-4) + "\n", "'offset' must be"),
    "nbytes mismatch": (HEADER + "\n" + _tensor(nbytes=8) + "\n", "nbytes 8 does not match"),
    "offset without nbytes": (HEADER + "\n" + _tensor(nbytes="DROP") + "\n", "nbytes None"),
    "shape not ints": (HEADER + "\n" + _tensor(shape=[1.0]) + "\n", "shape must be a list"),
    "name not a string": (HEADER + "\n" + _tensor(name=5) + "\n", "'name' must be a string"),
    "stats not an object": (HEADER + "\n" + _tensor(stats=[1]) + "\n", "stats must be"),
    "recorded twice": (HEADER + "\n" + _tensor() + "\n" + _tensor(seq=1) + "\n",
                       "recorded twice (first at line 2)"),
    "end count wrong": (HEADER + "\n" + _tensor() + '\n{"type":"end","records":2}\n',
                        "says 2 records but the index has 1"),
    "line after end": (HEADER + '\n{"type":"end"}\n' + _tensor() + "\n",
                       "line 3: content after the end line"),
    "torn line after end": (HEADER + '\n{"type":"end"}\n{"type":"ten',
                            "torn line after the end line"),
}


@pytest.mark.parametrize("case", list(READER_REJECTS))
def test_reader_rejects(tmp_path, case):
    index, words = READER_REJECTS[case]
    path = _dump_from_text(tmp_path / "d", index)
    with pytest.raises(DumpError) as info:
        open_dump(path)
    assert str(info.value).startswith(str(path)) and words in str(info.value)


def test_same_name_in_two_ranks_is_not_a_duplicate(tmp_path):
    index = HEADER + "\n" + _tensor(rank=0) + "\n" + _tensor(seq=1, rank=1) + "\n"
    with open_dump(_dump_from_text(tmp_path / "d", index)) as dump:
        assert [r.extra["rank"] for r in dump] == [0, 1]


# -- store bugs found while writing this file (see the report) --------------------------------
def test_empty_tensor_in_a_dump_with_empty_data_file(tmp_path):
    w = DumpWriter(tmp_path / "d")
    w.write("empty", 0, "float32", (0, 3), b"")
    w.close()
    assert (tmp_path / "d" / "data.bin").stat().st_size == 0
    with open_dump(tmp_path / "d") as dump:
        got = dump.read(dump.records[0])
        assert got.shape == (0, 3) and got.dtype == np.float32
        assert lockstep.compare(dump, dump).verdict == "match"


def test_header_meta_that_is_not_an_object_is_a_dump_error(tmp_path):
    path = _dump_from_text(
        tmp_path / "d", '{"type":"header","format":"lockstep-dump","version":1,"meta":[1]}\n')
    with pytest.raises(DumpError, match=re.escape(str(path))):
        open_dump(path)


# -- (f) stats-only dumps --------------------------------------------------------------------
def test_stats_only_dump(tmp_path):
    with lockstep.record(tmp_path / "s", data=False) as rec:
        lockstep.probe("x", torch.tensor([[1.0, -2.0], [0.0, 4.0]]))
        lockstep.probe("y", torch.tensor([1.0, math.nan, math.inf, -3.0, 0.0]))
        rec.next_step()
        lockstep.probe("ids", torch.tensor([5, 7, 0]))
    assert (tmp_path / "s" / "data.bin").stat().st_size == 0
    lines = (tmp_path / "s" / "index.jsonl").read_text().splitlines()
    assert sum('"offset":null,"nbytes":null,"stats":{' in line for line in lines) == 3
    with open_dump(tmp_path / "s") as dump:
        assert dump.complete and dump.meta["stats_only"] is True
        x, y, ids = dump.records
        assert [(r.name, r.step, r.dtype, r.shape) for r in dump] == [
            ("x", 0, "float32", (2, 2)), ("y", 0, "float32", (5,)), ("ids", 1, "int64", (3,))]
        for r in dump:
            assert not r.has_data and r.offset is None and r.nbytes is None
        assert {k: x.stats[k] for k in ("min", "max", "abs_max", "nan", "inf", "zero")} == {
            "min": -2.0, "max": 4.0, "abs_max": 4.0, "nan": 0, "inf": 0, "zero": 1}
        assert x.stats["mean"] == pytest.approx(0.75, rel=1e-6)
        assert x.stats["std"] == pytest.approx(math.sqrt(4.6875), rel=1e-6)
        assert {k: y.stats[k] for k in ("min", "max", "abs_max", "nan", "inf", "zero")} == {
            "min": -3.0, "max": 1.0, "abs_max": 3.0, "nan": 1, "inf": 1, "zero": 1}
        assert y.stats["mean"] == pytest.approx(-2 / 3, rel=1e-6)
        assert y.stats["std"] == pytest.approx(math.sqrt(26 / 9), rel=1e-6)
        assert (ids.stats["min"], ids.stats["max"], ids.stats["zero"]) == (0.0, 7.0, 1)
        assert ids.stats["mean"] == pytest.approx(4.0) and ids.stats["std"] == pytest.approx(
            math.sqrt(26 / 3))
        with pytest.raises(DumpError, match="statistics only"):
            dump.read(x)
        result = lockstep.compare(dump, dump)
    assert result.verdict == "match" and len(result.results) == 3
    assert all(p.note == "statistics only (no data recorded)" and p.error == 0.0
               for p in result.results)
