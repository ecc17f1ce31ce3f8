"""Properties of the store, for any input Hypothesis can build: what the writer writes reads
back byte for byte; whatever bytes an index holds, the reader returns a dump or raises
DumpError, and every record it returns can be read; names are always printable."""

from __future__ import annotations

import json
import math
import os
import warnings
from collections import Counter

import numpy as np
import pytest

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from lockstep.display import safe  # noqa: E402
from lockstep.errors import DumpError, UsageError  # noqa: E402
from lockstep.store import DTYPES, DumpWriter, array_stats, open_dump  # noqa: E402

# LOCKSTEP_HYPOTHESIS_EXAMPLES=1000 for a long run (60 in the normal suite)
SETTINGS = settings(max_examples=int(os.environ.get("LOCKSTEP_HYPOTHESIS_EXAMPLES", "60")),
                    deadline=None,
                    suppress_health_check=[HealthCheck.function_scoped_fixture,
                                           HealthCheck.too_slow])
NAMES = st.text(st.characters(exclude_categories=["Cs"]), max_size=12)
SHAPES = st.lists(st.integers(0, 4), max_size=4)


@st.composite
def records(draw):
    out = []
    for _ in range(draw(st.integers(0, 8))):
        dtype = draw(st.sampled_from(sorted(DTYPES)))
        shape = tuple(draw(SHAPES))
        size = math.prod(shape) * DTYPES[dtype].itemsize
        data = draw(st.binary(min_size=size, max_size=size)) if draw(st.booleans()) else None
        out.append((draw(NAMES), draw(st.integers(0, 3)), dtype, shape, data))
    return out


@SETTINGS
@given(records(), st.dictionaries(NAMES, st.integers() | NAMES, max_size=3))
def test_what_the_writer_writes_reads_back(tmp_path_factory, recs, meta):
    path = tmp_path_factory.mktemp("rt") / "d"
    w = DumpWriter(path, meta)
    calls: Counter = Counter()
    expect = []
    for name, step, dtype, shape, data in recs:
        call = calls[(step, name)]
        calls[(step, name)] += 1
        w.write(name, step, dtype, shape, data, call=call)
        expect.append((step, name, call, dtype, shape, data))
    w.close()
    with open_dump(path) as dump:
        assert dump.complete and dump.meta == meta and len(dump) == len(expect)
        for rec, (step, name, call, dtype, shape, data) in zip(dump, expect):
            assert (rec.step, rec.name, rec.call, rec.dtype, rec.shape) == \
                (step, name, call, dtype, shape)
            if data is None:
                assert not rec.has_data
            else:
                assert dump.raw(rec).tobytes() == data
                with warnings.catch_warnings():
                    warnings.simplefilter("error")
                    dump.stats(rec)


@SETTINGS
@given(st.text(st.characters(categories=["Cs"]), min_size=1, max_size=3), NAMES)
def test_the_writer_refuses_any_name_with_a_surrogate(tmp_path_factory, bad, name):
    w = DumpWriter(tmp_path_factory.mktemp("s") / "d")
    with pytest.raises(UsageError, match="surrogate"):
        w.write(name + bad, 0, "float32", (0,), b"")
    w.close()


JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False)
    | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner,
                                                                max_size=4),
    max_leaves=12)
FIELDS = st.fixed_dictionaries(
    {}, optional={k: JSON | st.integers(-2, 2 ** 70) for k in
                  ("name", "step", "seq", "call", "dtype", "shape", "offset", "nbytes", "stats",
                   "rank")})


@SETTINGS
@given(st.lists(FIELDS, max_size=4), st.binary(max_size=64))
def test_any_tensor_lines_give_a_dump_or_a_dump_error(tmp_path_factory, lines, data):
    path = tmp_path_factory.mktemp("lines")
    text = '{"type":"header","format":"lockstep-dump","version":1}\n' + "".join(
        json.dumps({"type": "tensor", **obj}) + "\n" for obj in lines)
    (path / "index.jsonl").write_text(text)
    (path / "data.bin").write_bytes(data)
    _read_everything(path)


@SETTINGS
@given(st.binary(max_size=400))
def test_any_index_bytes_give_a_dump_or_a_dump_error(tmp_path_factory, raw):
    path = tmp_path_factory.mktemp("bytes")
    (path / "index.jsonl").write_bytes(b'{"type":"header","format":"lockstep-dump",'
                                       b'"version":1}\n' + raw)
    _read_everything(path)


def _read_everything(path) -> None:
    try:
        dump = open_dump(path)
    except DumpError:
        return
    with dump:
        for rec in dump:
            safe(rec.name).encode("utf-8")
            if rec.has_data:
                assert dump.read(rec).shape == rec.shape
            if rec.has_data or rec.stats:
                dump.stats(rec)


@SETTINGS
@given(st.text())
def test_safe_text_is_printable_and_encodable(s):
    shown = safe(s)
    shown.encode("utf-8")
    assert all(ch.isprintable() or ch == " " for ch in shown)
    if s.isprintable():
        assert shown == s


@SETTINGS
@given(st.lists(st.floats(width=32) | st.sampled_from([math.inf, -math.inf, math.nan]),
                max_size=50), st.sampled_from([np.float32, np.float64]))
def test_stats_count_nan_and_inf_without_warnings(values, dtype):
    arr = np.array(values, dtype=dtype)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        s = array_stats(arr)
    assert s["nan"] == int(np.isnan(arr).sum()) and s["inf"] == int(np.isinf(arr).sum())
    finite = arr[np.isfinite(arr)]
    if finite.size:
        assert s["min"] == float(finite.min()) and s["max"] == float(finite.max())
