"""Writing a dump never loses or mixes data: what overwrite may replace, one writer per dump,
and paths that cannot be written are one-line errors (docs/format.md, "Writing a dump")."""

from __future__ import annotations

import multiprocessing
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

import lockstep
from lockstep.errors import UsageError
from lockstep.store import DumpWriter, open_dump

CLI = [sys.executable, "-m", "lockstep.cli.main"]


def _dump(path: Path, value: float = 1.0) -> Path:
    w = DumpWriter(path, {"engine": "old"})
    w.write("x", 0, "float32", (2,), np.full(2, value, np.float32).tobytes())
    w.close()
    return path


def _tree(path: Path) -> dict[str, bytes]:
    return {str(p.relative_to(path)): p.read_bytes() if p.is_file() else b"<dir>"
            for p in sorted(path.rglob("*"))}


def test_overwrite_refuses_a_folder_that_merely_holds_an_index(tmp_path):
    d = tmp_path / "work"
    (d / "sub").mkdir(parents=True)
    (d / "index.jsonl").write_text('{"type":"header","format":"lockstep-dump","version":1}\n')
    (d / "thesis.tex").write_text("years of work")
    (d / "sub" / "notes.txt").write_text("more")
    before = _tree(d)
    with pytest.raises(UsageError, match="holds more than a lockstep dump.*thesis.tex"):
        DumpWriter(d, overwrite=True)
    assert _tree(d) == before


def test_overwrite_refuses_an_index_that_is_not_a_dump(tmp_path):
    d = tmp_path / "d"
    d.mkdir()
    (d / "index.jsonl").write_text("my own jsonl\n")
    with pytest.raises(UsageError, match="does not begin with a lockstep header"):
        DumpWriter(d, overwrite=True)
    assert (d / "index.jsonl").read_text() == "my own jsonl\n"


def test_overwrite_replaces_a_dump_in_place(tmp_path):
    d = _dump(tmp_path / "d", 1.0)
    w = DumpWriter(d, {"engine": "new"}, overwrite=True)
    w.write("y", 0, "float32", (1,), np.ones(1, np.float32).tobytes())
    w.close()
    with open_dump(d) as dump:
        assert dump.meta["engine"] == "new" and [r.name for r in dump] == ["y"]
    assert sorted(os.listdir(d)) == ["data.bin", "index.jsonl"]


def test_without_overwrite_an_existing_dump_is_kept(tmp_path):
    d = _dump(tmp_path / "d")
    before = _tree(d)
    with pytest.raises(UsageError, match="already exists and is not empty"):
        DumpWriter(d)
    assert _tree(d) == before


@pytest.mark.parametrize("case", ["parent is a file", "proc", "path is a file"])
def test_unwritable_paths_are_usage_errors(tmp_path, case):
    (tmp_path / "afile").write_text("x")
    path = {"parent is a file": tmp_path / "afile" / "sub.lsd", "proc": Path("/proc/x"),
            "path is a file": tmp_path / "afile"}[case]
    with pytest.raises(UsageError, match=str(path)):
        DumpWriter(path)
    assert (tmp_path / "afile").read_text() == "x"


def test_symlinks_are_never_written_through(tmp_path):
    target = _dump(tmp_path / "real")
    before = _tree(target)
    (tmp_path / "link").symlink_to(target)
    for overwrite in (False, True):
        with pytest.raises(UsageError, match="symbolic link"):
            DumpWriter(tmp_path / "link", overwrite=overwrite)
    victim = tmp_path / "victim.txt"
    victim.write_text("keep me")
    d = tmp_path / "d"
    d.mkdir()
    (d / "index.jsonl").symlink_to(victim)
    with pytest.raises(UsageError, match="symbolic link"):
        DumpWriter(d, overwrite=True)
    assert victim.read_text() == "keep me" and _tree(target) == before


def test_a_second_writer_in_the_same_process_is_refused(tmp_path):
    first = DumpWriter(tmp_path / "d")
    for overwrite in (False, True):
        with pytest.raises(UsageError, match="another process is recording to"):
            DumpWriter(tmp_path / "d", overwrite=overwrite)
    first.write("x", 0, "float32", (1,), np.ones(1, np.float32).tobytes())
    first.close()
    with open_dump(tmp_path / "d") as dump:
        assert len(dump) == 1 and dump.complete


def _racer(path: str, who: int, overwrite: bool, barrier, results) -> None:
    barrier.wait()
    try:
        with lockstep.record(path, meta={"who": who}, overwrite=overwrite):
            for i in range(5):
                lockstep.probe(f"t{i}", np.full(3, who, np.float32))
                time.sleep(0.005)
    except UsageError as exc:
        results.put((who, "refused", str(exc)))
        return
    except BaseException as exc:  # anything else is the bug this test is for
        results.put((who, "crashed", f"{type(exc).__name__}: {exc}"))
        return
    results.put((who, "ok", ""))


@pytest.mark.parametrize("overwrite", [False, True])
def test_two_processes_recording_to_one_path(tmp_path, overwrite):
    ctx = multiprocessing.get_context("fork")
    tally = {"one ok, one busy": 0}
    for trial in range(100 if not overwrite else 50):
        path = tmp_path / f"race{trial}"
        if overwrite:
            _dump(path, -1.0)
        barrier, results = ctx.Barrier(2), ctx.Queue()
        procs = [ctx.Process(target=_racer, args=(str(path), who, overwrite, barrier, results))
                 for who in (1, 2)]
        for p in procs:
            p.start()
        for p in procs:
            p.join(30)
        out = sorted(results.get(timeout=5) for _ in procs)
        kinds = sorted(kind for _, kind, _ in out)
        assert kinds == ["ok", "refused"], out
        winner = next(who for who, kind, _ in out if kind == "ok")
        message = next(msg for _, kind, msg in out if kind == "refused")
        assert "another process is recording to" in message, message
        tally["one ok, one busy"] += 1
        with open_dump(path) as dump:
            assert dump.complete and dump.meta["who"] == winner
            assert [r.name for r in dump] == [f"t{i}" for i in range(5)]
            assert all((dump.read(r) == winner).all() for r in dump)
    assert tally["one ok, one busy"] == (100 if not overwrite else 50)


def test_cli_run_into_an_unwritable_path_is_one_line(tmp_path):
    (tmp_path / "afile").write_text("x")
    prog = tmp_path / "prog.py"
    prog.write_text("print('hi')\n")
    res = subprocess.run([*CLI, "run", "--out", str(tmp_path / "afile" / "sub.lsd"), "--",
                          "python", str(prog)], capture_output=True, text=True, timeout=120)
    assert res.returncode == 2, res.stderr
    assert res.stderr.startswith("lockstep: error: cannot create the dump")
    assert len(res.stderr.splitlines()) == 1 and "Traceback" not in res.stderr


def test_a_disk_that_refuses_writes_is_one_line_exit_2(tmp_path):
    prog = tmp_path / "prog.py"
    prog.write_text("import numpy as np, lockstep\n"
                    "for i in range(40):\n"
                    "    lockstep.probe(f'x{i}', np.zeros(256, np.float32))\n")
    out = tmp_path / "d"
    limited = ("import resource, signal, sys\n"
               "signal.signal(signal.SIGXFSZ, signal.SIG_IGN)\n"
               "resource.setrlimit(resource.RLIMIT_FSIZE, (8192, 8192))\n"
               "from lockstep.cli.main import main\n"
               f"sys.exit(main(['run', '--out', {str(out)!r}, '--', 'python', {str(prog)!r}]))\n")
    res = subprocess.run([sys.executable, "-c", limited], capture_output=True, text=True,
                         timeout=120)
    assert res.returncode == 2, res.stderr
    assert len(res.stderr.splitlines()) == 1 and "Traceback" not in res.stderr
    assert res.stderr.startswith(f"lockstep: error: cannot write the dump {out}: File too "
                                 "large")
    with open_dump(out) as dump:  # what was written before is kept, and why it ends there
        assert len(dump) >= 1 and "File too large" in dump.error


@pytest.mark.parametrize("overwrite", [False, True])
def test_a_fifo_in_place_of_the_index_never_blocks(tmp_path, overwrite):
    d = tmp_path / "d"
    d.mkdir()
    os.mkfifo(d / "index.jsonl")
    code = ("import sys\nfrom lockstep.store import DumpWriter\nfrom lockstep.errors import "
            f"UsageError\ntry:\n    DumpWriter({str(d)!r}, overwrite={overwrite})\n"
            "except UsageError as exc:\n    print(exc)\n")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=30)
    assert res.returncode == 0 and "Traceback" not in res.stderr, res.stderr
    assert ("not a regular file" if overwrite else "already exists") in res.stdout
