"""Dumps anyone could write, read by ``lockstep show`` in a real process: a one-line error
(exit 2) or a listing that prints every name as the text it is, never a traceback; and an
internal error is one line, exit 4, with the traceback behind --debug."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from lockstep.errors import DumpError
from lockstep.store import DumpWriter, open_dump

CLI = [sys.executable, "-m", "lockstep.cli.main"]
HEADER = {"type": "header", "format": "lockstep-dump", "version": 1}


def lockstep(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([*CLI, *args], capture_output=True, timeout=120,
                          env={**os.environ, "COLUMNS": "200", "PYTHONWARNINGS": "default"})


def _dump(path: Path, lines: list[dict | str], data: bytes = b"\0" * 64) -> Path:
    path.mkdir(parents=True)
    text = "".join((ln if isinstance(ln, str) else json.dumps(ln)) + "\n" for ln in lines)
    (path / "index.jsonl").write_text(text, encoding="utf-8")
    (path / "data.bin").write_bytes(data)
    return path


def _tensor(**over) -> dict:
    return {"type": "tensor", "name": "x", "step": 0, "seq": 0, "dtype": "float32",
            "shape": [1], "offset": 0, "nbytes": 4, **over}


BIG = "1" * 4301
REJECTED = {
    "rank is a list": ([HEADER, _tensor(rank=[0])], "rank"),
    "rank is an object": ([HEADER, _tensor(rank={})], "rank"),
    "huge int in a tensor line": (
        [HEADER, json.dumps(_tensor()).replace('"step": 0', f'"step": {BIG}')], "not usable"),
    "huge int in the header": (
        [json.dumps({**HEADER, "meta": {"n": 0}}).replace('"n": 0', f'"n": {BIG}')],
        "not usable"),
    "65 dimensions": ([HEADER, _tensor(shape=[1] * 65, offset=None, nbytes=None)],
                      "65 dimensions"),
    "empty, 2**70 wide": ([HEADER, _tensor(shape=[0, 2 ** 70], nbytes=0)], "absurd shape"),
    "empty, 2**62 wide": ([HEADER, _tensor(shape=[0, 2 ** 62], nbytes=0)], "absurd shape"),
    "nested 100,000 deep": ([HEADER, '{"type":"meta","meta":' + "[" * 100000 + "]" * 100000
                             + "}"], "nested too deeply"),
    "nested 65 deep": ([HEADER, '{"type":"meta","meta":{"a":' + "[" * 65 + "]" * 65 + "}}"],
                       "nested too deeply"),
}


@pytest.mark.parametrize("case", list(REJECTED))
def test_hostile_index_is_one_line_exit_2(tmp_path, case):
    lines, words = REJECTED[case]
    path = _dump(tmp_path / "d", lines)
    with pytest.raises(DumpError, match=words):
        open_dump(path)
    res = lockstep("show", str(path))
    err = res.stderr.decode()
    assert res.returncode == 2, err
    assert err.startswith("lockstep: error: ") and len(err.splitlines()) == 1
    assert words in err and "Traceback" not in err and len(err) < 1000


MARKUP = ["[/]", "[bold]x", "[/x]", "[red]y[/red]", "a\x1b[31mb"]


def test_names_metadata_and_paths_print_as_text(tmp_path):
    folder = tmp_path / "[/x]"
    w = DumpWriter(folder / "[bold]d", {"engine": "[/]", "model": "[bold]m"})
    for name in MARKUP:
        w.write(name, 0, "float32", (1,), np.ones(1, np.float32).tobytes())
    w.close()
    res = lockstep("show", str(folder / "[bold]d"))
    out, err = res.stdout.decode(), res.stderr.decode()
    assert res.returncode == 0, err
    assert str(folder / "[bold]d") in out
    for name in MARKUP[:4]:
        assert name in out, name
    assert "a\\x1b[31mb" in out and "\x1b" not in out  # the escape is shown, not obeyed
    assert "engine: [/]" in out and "model: [bold]m" in out


def test_a_lone_surrogate_written_by_another_writer_is_shown_escaped(tmp_path):
    path = _dump(tmp_path / "d", [HEADER, '{"type":"tensor","name":"n\\ud800","step":0,'
                                          '"seq":0,"dtype":"float32","shape":[1],"offset":0,'
                                          '"nbytes":4}'])
    res = lockstep("show", str(path))
    assert res.returncode == 0, res.stderr.decode()
    assert "n\\ud800" in res.stdout.decode()
    # compare lists it as unpaired against another dump (the fuzz's case 7946: exit 4 before)
    m = '{"type":"tensor","name":"m","step":0,"seq":0,"dtype":"float32","shape":[1],' \
        '"offset":0,"nbytes":4}'
    both = _dump(tmp_path / "b", [HEADER, m, '{"type":"tensor","name":"n\\ud800","step":0,'
                                             '"seq":1,"dtype":"float32","shape":[2],'
                                             '"offset":4,"nbytes":8}'])
    res = lockstep("compare", str(both), str(_dump(tmp_path / "o", [HEADER, m])))
    assert res.returncode in (0, 1, 3), res.stderr.decode()
    assert "n\\ud800" in res.stdout.decode() and "internal error" not in res.stderr.decode()


def test_nan_and_inf_data_print_no_warnings(tmp_path):
    w = DumpWriter(tmp_path / "d")
    values = {"float32": np.array([np.nan, np.inf, -np.inf, 1, 3e38, -3e38], np.float32),
              "float64": np.array([1e308, 1e308, np.nan], np.float64),
              "float16": np.array([np.inf, 65504, np.nan], np.float16)}
    for dtype, arr in values.items():
        w.write(dtype, 0, dtype, arr.shape, arr.tobytes())
    w.write("allnan", 0, "float32", (3,), np.full(3, np.nan, np.float32).tobytes())
    w.close()
    res = lockstep("show", str(tmp_path / "d"))
    assert res.returncode == 0 and res.stderr.decode() == ""
    with open_dump(tmp_path / "d") as dump:
        assert dump.stats(dump.get(0, "float64"))["mean"] == 1e308


def test_show_summarises_and_lists_all_on_request(tmp_path):
    w = DumpWriter(tmp_path / "d")
    for step in range(3):
        for i in range(300):
            w.write(f"r{i}", step, "float32", (1,), np.ones(1, np.float32).tobytes())
    w.close()
    out = lockstep("show", str(tmp_path / "d")).stdout.decode()
    assert "records (200 of 900)" in out and "700 more records" in out
    assert "r199" in out and "r200 " not in out
    out = lockstep("show", str(tmp_path / "d"), "--step", "2", "--limit", "5").stdout.decode()
    assert "records (5 of 300)" in out
    out = lockstep("show", str(tmp_path / "d"), "--all").stdout.decode()
    assert "records (900 of 900)" in out and "more records" not in out


BUG = ("import sys; from lockstep.cli import main as m; "
       "m._COMMANDS['compare'] = lambda args: 1 // 0; sys.exit(m.main(sys.argv[1:]))")


def test_an_internal_error_is_one_line_exit_4(tmp_path):
    res = subprocess.run([sys.executable, "-c", BUG, "compare", "a", "b"],
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 4
    lines = res.stderr.splitlines()
    assert len(lines) == 1 and "Traceback" not in res.stderr
    assert lines[0].startswith("lockstep: internal error: ZeroDivisionError")
    assert "this is a bug in lockstep" in lines[0] and "lockstep doctor" in lines[0]
    res = subprocess.run([sys.executable, "-c", BUG, "--debug", "compare", "a", "b"],
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 4
    assert "Traceback" in res.stderr and "ZeroDivisionError" in res.stderr
    assert res.stderr.splitlines()[-1].startswith("lockstep: internal error:")


def test_links_inside_a_dump_are_not_followed(tmp_path):
    good = DumpWriter(tmp_path / "good")
    good.write("x", 0, "float32", (1,), np.ones(1, np.float32).tobytes())
    good.close()
    secret = tmp_path / "secret"
    secret.write_bytes(b"\x00\x00\x80\x3f" * 16)
    d = tmp_path / "d"
    d.mkdir()
    (d / "index.jsonl").write_bytes((tmp_path / "good" / "index.jsonl").read_bytes())
    (d / "data.bin").symlink_to(secret)
    res = lockstep("show", str(d))
    assert res.returncode == 2 and b"data.bin is a symbolic link" in res.stderr
    (d / "data.bin").unlink()
    (d / "data.bin").write_bytes((tmp_path / "good" / "data.bin").read_bytes())
    (d / "index.jsonl").unlink()
    (d / "index.jsonl").symlink_to(tmp_path / "good" / "index.jsonl")
    assert lockstep("show", str(d)).returncode == 2
    assert lockstep("show", str(d / "index.jsonl")).returncode == 0  # named: its target


def test_a_fifo_in_place_of_a_file_is_refused_at_once(tmp_path):
    d = tmp_path / "d"
    d.mkdir()
    os.mkfifo(d / "index.jsonl")
    res = lockstep("show", str(d))
    assert res.returncode == 2 and b"not a regular file" in res.stderr


def test_a_report_file_that_cannot_be_written_is_a_user_error(tmp_path):
    from safetensors.numpy import save_file

    save_file({"a": np.ones(2, np.float32)}, str(tmp_path / "a.safetensors"))
    res = subprocess.run([*CLI, "inspect", str(tmp_path / "a.safetensors"), "--json",
                          str(tmp_path / "no" / "such" / "r.json")], capture_output=True,
                         text=True, timeout=60)
    assert res.returncode == 2 and "Traceback" not in res.stderr
    assert res.stderr == f"lockstep: error: {tmp_path / 'no' / 'such' / 'r.json'}: No such " \
                         "file or directory\n"


@pytest.mark.parametrize("step", [2 ** 63, 2 ** 70, 10 ** 300])
def test_a_huge_step_is_listed(tmp_path, step):
    # found by benchmarks/fuzz_inputs.py --cases 1000 --seed 3 (cases 843, 937): the steps
    # line built range(0, step), an OverflowError (or, for 2**40, a list of 2**40 ints)
    path = _dump(tmp_path / "d", [HEADER, _tensor(), _tensor(step=step, seq=1)])
    res = lockstep("show", str(path), "--step", "0")
    assert res.returncode == 0, res.stderr.decode()
    assert f"steps0,{step}," in "".join(res.stdout.decode().split())  # (a long line wraps)


def test_compare_prints_markup_like_names_as_text(tmp_path):
    """Names are data: a record named ``[/]`` (rich's closing tag) and one named
    ``[bold]x`` are printed as written, and the comparison's own exit code stands."""
    import os
    import subprocess
    import sys

    import numpy as np

    import lockstep

    for side, scale in (("ref", 1.0), ("cand", 2.0)):
        with lockstep.record(tmp_path / f"{side}.lsd") as rec:
            rec.capture("[/]", np.ones(8, np.float32))
            rec.capture("[bold]x", np.full(8, scale, np.float32))
    got = subprocess.run([sys.executable, "-m", "lockstep.cli.main", "compare",
                          str(tmp_path / "ref.lsd"), str(tmp_path / "cand.lsd"), "--all"],
                         capture_output=True, text=True, timeout=120,
                         env={**os.environ, "COLUMNS": "200"})
    assert got.returncode in (1, 3), got.stdout + got.stderr
    assert "internal error" not in got.stderr and "Traceback" not in got.stderr
    assert "[bold]x" in got.stdout and "[/]" in got.stdout
