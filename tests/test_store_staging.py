"""Small records are staged and written together: what a flush returned from is whole on
disk (a process killed right after it keeps it), the bytes and offsets are those of a writer
that writes every record alone, and a refused write keeps exactly the records that reached
the OS."""

from __future__ import annotations

import json
import shutil

import numpy as np

from lockstep.store import DumpWriter, open_dump
from lockstep.store.writer import STAGE_LIMIT

# small (staged), at the limit (alone), and large (alone, after the stage)
SIZES = [1, 3, 700, STAGE_LIMIT // 4 - 1, STAGE_LIMIT // 4, 3 * STAGE_LIMIT]


def test_each_flush_leaves_every_record_so_far_on_disk(tmp_path):
    rng = np.random.default_rng(1)
    w = DumpWriter(tmp_path / "live")
    written: list[np.ndarray] = []
    for step in range(12):
        for i in range(25):
            a = rng.standard_normal(SIZES[(step + i) % len(SIZES)]).astype(np.float32)
            w.write(f"s{step}.r{i}", step, "float32", a.shape, memoryview(a))
            written.append(a)
        w.flush()
        killed = tmp_path / f"killed{step}"  # what a SIGKILL right after the flush leaves
        shutil.copytree(tmp_path / "live", killed)
        with open_dump(killed) as dump:
            assert not dump.complete and len(dump) == len(written)
            for rec, a in zip(dump, written):
                assert np.array_equal(dump.read(rec), a), rec.name
            assert all(rec.offset % 64 == 0 for rec in dump)
    w.close()


def test_a_refused_write_keeps_the_records_that_reached_the_disk(tmp_path, monkeypatch):
    w = DumpWriter(tmp_path / "d")
    limit = 10_000  # the OS takes this many bytes of data.bin, then refuses
    real = w._write_all.__func__

    def capped(self, parts, total):
        room = limit - self._out
        if total > room:  # write what fits, as a file size limit would
            data = b"".join(bytes(memoryview(p).cast("B")) for p in parts)[:max(room, 0)]
            real(self, [data], len(data))
            raise self._refused(OSError(27, "File too large"))
        real(self, parts, total)

    monkeypatch.setattr(DumpWriter, "_write_all", capped)
    for i in range(40):  # 40 records of 1 KiB, all staged until the close
        w.write(f"x{i}", 0, "float32", (256,), memoryview(np.full(256, i, np.float32)))
    try:
        w.close()
    except Exception as exc:  # the refusal is reported, after the index is written
        assert "File too large" in str(exc)
    else:
        raise AssertionError("the refused write was not reported")
    with open_dump(tmp_path / "d") as dump:
        kept = limit // 1024  # whole records within the bytes the OS took
        assert len(dump) == kept and "File too large" in dump.error
        for i, rec in enumerate(dump):
            assert dump.read(rec).tolist() == [float(i)] * 256
        end = json.loads((tmp_path / "d" / "index.jsonl").read_text().splitlines()[-1])
        assert end["records"] == kept


def test_after_a_refused_write_nothing_lands_where_its_offset_does_not_point(tmp_path,
                                                                             monkeypatch):
    # The disk fills in the middle of a record, then has room again (a file was deleted).
    # The file now ends short of where the offsets say: a later record written anyway would
    # be read from the wrong bytes. So the writer refuses every record after the first
    # refusal, and the end line says why, also when the caller closes without an error.
    w = DumpWriter(tmp_path / "d")
    room = {"limit": 300_000}
    real = w._write_all.__func__

    def filling(self, parts, total):
        left = room["limit"] - self._out
        if total > left:
            data = b"".join(bytes(memoryview(p).cast("B")) for p in parts)[:max(left, 0)]
            real(self, [data], len(data))
            room["limit"] = 1 << 40  # room again after this write
            raise self._refused(OSError(28, "No space left on device"))
        real(self, parts, total)

    monkeypatch.setattr(DumpWriter, "_write_all", filling)
    refused = []
    for i in range(5):  # 200 KB each: the second is cut short by the full disk
        a = np.full(50_000, i, np.float32)
        try:
            w.write(f"x{i}", 0, "float32", a.shape, memoryview(a))
        except Exception as exc:
            refused.append((i, str(exc)))
    assert [i for i, _ in refused] == [1, 2, 3, 4]
    assert "nothing more is recorded after it ('x3' is not)" in refused[2][1]
    w.close()
    with open_dump(tmp_path / "d") as dump:
        assert [r.name for r in dump] == ["x0"]
        assert dump.read(dump.get(0, "x0")).tolist() == [0.0] * 50_000
        assert "No space left on device" in dump.error
