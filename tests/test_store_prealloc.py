"""Blocks reserved ahead of a dump's writes (store/prealloc.py): on the file systems where it
is done, the file's size is always the end of its data (also when the writer is killed), the
blocks past it are given back at close, and the bytes read back are those written."""

from __future__ import annotations

import os
import textwrap

import numpy as np
import pytest

from killing import kill_after
from lockstep.store import DumpWriter, open_dump, prealloc


def _reserving(path) -> bool:
    fd = os.open(path, os.O_RDONLY)
    try:
        return prealloc.file_system(fd) is not None
    finally:
        os.close(fd)


def test_a_closed_dump_keeps_no_block_past_its_data(tmp_path):
    if not _reserving(tmp_path):
        pytest.skip("blocks are reserved on ext4 and XFS only; tmp_path is on neither")
    rng = np.random.default_rng(0)
    w = DumpWriter(tmp_path / "d")
    assert w._prealloc is not None
    arrays = [rng.standard_normal(n).astype(np.float32) for n in (5, 70_000, 300_000, 9)]
    for i, a in enumerate(arrays):
        w.write(f"r{i}", 0, "float32", a.shape, memoryview(a))
        w.flush()
        data = tmp_path / "d" / "data.bin"
        st = os.stat(data)
        # reserved ahead (a chunk of at least 16 MiB), and yet the size is the data's end
        assert st.st_size == w._out and st.st_blocks * 512 >= 16 << 20
    w.close()
    st = os.stat(data)
    assert st.st_blocks * 512 < st.st_size + (64 << 10)  # the reserve given back
    with open_dump(tmp_path / "d") as dump:
        assert dump.complete
        for rec, a in zip(dump, arrays):
            assert np.array_equal(dump.read(rec), a)


def test_a_killed_writer_leaves_a_file_the_size_of_its_data(tmp_path):
    if not _reserving(tmp_path):
        pytest.skip("blocks are reserved on ext4 and XFS only; tmp_path is on neither")
    script = tmp_path / "rec.py"
    script.write_text(textwrap.dedent("""
        import sys, time
        import numpy as np
        import lockstep
        with lockstep.record(sys.argv[1]) as rec:
            for step in range(3):
                rec.step()
                rec.capture("x", np.full(100_000, step, np.float32))
            rec.flush()
            print("written", flush=True)
            time.sleep(60)
    """))
    out = tmp_path / "killed.lsd"
    kill_after(script, out, "written")
    size = os.path.getsize(out / "data.bin")
    with open_dump(out) as dump:
        assert not dump.complete and len(dump) == 3
        last = list(dump)[-1]
        assert size == last.offset + last.nbytes  # no reserved zeros at the end
        assert [float(dump.read(r)[0]) for r in dump] == [0.0, 1.0, 2.0]


@pytest.mark.skipif(not os.path.isdir("/dev/shm"), reason="no /dev/shm here")
def test_nothing_is_reserved_on_tmpfs(tmp_path):
    # fallocate on tmpfs zeroes memory pages: the writes get slower, not faster
    path = "/dev/shm/lockstep-prealloc-test"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        assert prealloc.preallocator(fd) is None
    finally:
        os.close(fd)
        os.unlink(path)


def test_a_refused_reservation_leaves_the_writes_to_say_it(tmp_path):
    if not _reserving(tmp_path):
        pytest.skip("blocks are reserved on ext4 and XFS only; tmp_path is on neither")
    fd = os.open(tmp_path / "f", os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        p = prealloc.preallocator(fd)
        assert p is not None
        p.ahead(1 << 62)  # far beyond any file system's room: refused
        assert p.failed and p.reserved == 0
        p.ahead(10)  # nothing more is tried after a refusal
        assert p.reserved == 0
        os.write(fd, b"still written")
    finally:
        os.close(fd)
    assert (tmp_path / "f").read_bytes() == b"still written"
