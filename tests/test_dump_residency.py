"""Compare's memory stays bounded on dumps larger than memory: a dump drops its mapped pages
from the process once it has handed out RESIDENT_BYTES (Dump.trim), and tensor_metrics lets
the pages of one huge tensor go as it measures them. Arrays handed out before a trim stay
valid. (The RSS figures at 8.5 GB per dump: benchmarks/compare_throughput.py.)"""

from __future__ import annotations

import numpy as np

import lockstep
from lockstep.align.layouts import relative_error
from lockstep.compare.metrics import tensor_metrics
from lockstep.store import DumpWriter
from lockstep.store import reader as reader_module


def _dump(path, arrays):
    w = DumpWriter(path, {"engine": "t", "model": "m"})
    for i, a in enumerate(arrays):
        w.write(f"t{i}", 0, "float32", a.shape, a.tobytes())
    w.close()


def test_arrays_handed_out_stay_valid_across_trims(tmp_path, monkeypatch):
    monkeypatch.setattr(reader_module, "RESIDENT_BYTES", 1 << 16)  # trim every few tensors
    rng = np.random.default_rng(0)
    arrays = [rng.standard_normal(8192).astype(np.float32) for _ in range(12)]
    _dump(tmp_path / "d", arrays)
    trims = []
    with lockstep.open_dump(tmp_path / "d") as dump:
        real_trim = dump.trim
        monkeypatch.setattr(dump, "trim", lambda: (trims.append(1), real_trim())[1])
        views = [dump.read(r) for r in dump.records]
        assert len(trims) >= 4  # 12 x 32 KiB handed out against a 64 KiB budget
        for view, expected in zip(views, arrays):
            np.testing.assert_array_equal(view, expected)  # mapped again where trimmed


def test_one_huge_tensor_is_trimmed_as_it_is_measured():
    calls = []
    ref = np.ones(3 * (1 << 24), np.float32)
    m = tensor_metrics(ref, ref.copy(), trim=lambda: calls.append(1))
    assert m.rel_l2 == 0.0
    assert len(calls) == 3  # after each 2**24 elements


def test_compare_gives_the_same_result_with_a_tiny_budget(tmp_path, monkeypatch):
    rng = np.random.default_rng(1)
    ref = [rng.standard_normal(4096).astype(np.float32) for _ in range(6)]
    cand = [a + np.float32(1e-3) * (i == 4) for i, a in enumerate(ref)]
    _dump(tmp_path / "ref", ref)
    _dump(tmp_path / "cand", cand)
    before = lockstep.compare(tmp_path / "ref", tmp_path / "cand")
    monkeypatch.setattr(reader_module, "RESIDENT_BYTES", 4096)
    after = lockstep.compare(tmp_path / "ref", tmp_path / "cand")
    assert after.verdict == before.verdict
    assert [p.error for p in after.results] == [p.error for p in before.results]


def _rss_file_mb() -> float:
    with open("/proc/self/status", encoding="ascii") as f:
        for line in f:
            if line.startswith("RssFile:"):
                return int(line.split()[1]) / 1024
    raise AssertionError("no RssFile line")


def test_a_sample_of_a_huge_mapped_tensor_maps_little_of_it(tmp_path):
    """Pairing checks each template on a strided sample. Read in one go from a mapped 256 MB
    tensor, each sampled element maps its page and the pages around it (a large folio: up to
    2 MB), so nearly all of it became resident; gathered in pieces with trims between, the
    dump pages resident at any trim stay a small part of it, and the error is the same."""
    n = 64 << 20  # 256 MB of float32
    ref = np.arange(n, dtype=np.float32) % 977
    _dump(tmp_path / "ref", [ref])
    _dump(tmp_path / "cand", [ref * np.float32(1.001)])
    del ref
    with lockstep.open_dump(tmp_path / "ref") as a, lockstep.open_dump(tmp_path / "cand") as b:
        a.trim(), b.trim()
        base = _rss_file_mb()
        resident = []
        trim = reader_module.trimmer(a, b)

        def watched() -> None:
            resident.append(_rss_file_mb() - base)
            trim()

        err = relative_error(a.read(a.records[0]), b.read(b.records[0]), watched)
        assert len(resident) >= 64  # gathered in pieces
        assert max(resident) < 160, max(resident)  # of 512 MB mapped
        assert err == relative_error(a.read(a.records[0]), b.read(b.records[0]))
        assert abs(err - 0.001) < 1e-6
