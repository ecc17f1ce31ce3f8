"""The queued capture pipeline (capture/copies.py, capture/sink.py) exercised on CPU.

``copies="queue"`` sends every CPU tensor down the path CUDA tensors take: a copy into a
pooled host buffer, room reserved in a bounded queue first, a writer thread that writes in
capture order. These tests check that this path writes the very bytes the direct path does
(a real tiny transformers model), that a slow writer makes the engine wait instead of the
queue growing, that a refused write on the writer thread reaches the engine's thread, and
that an exception or a SIGKILL mid-step leaves a readable dump.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import lockstep
from killing import kill_after
from lockstep.capture.copies import HostPool, size_class
from lockstep.capture.sink import Sink
from lockstep.capture.tensors import HostTensor, to_host
from lockstep.engines.hf import forward_step
from lockstep.errors import DumpWriteError, UsageError
from lockstep.store.reader import open_dump
from lockstep.store.writer import DumpWriter
from models import PROMPT, tiny


def _record_tiny(path: Path, copies: str, *, data: bool, stats: bool) -> None:
    model = tiny("llama")
    ids = torch.tensor([PROMPT])
    with torch.no_grad(), lockstep.record(path, meta={"created": 0}, copies=copies,
                                          data=data, stats=stats) as rec:
        rec.watch(model, inputs=True)
        out, cache = forward_step(model, ids, None)
        for _ in range(2):  # decode steps: many small records, some aliases
            out, cache = forward_step(model, out.logits[:, -1:].argmax(-1), cache)


@pytest.mark.parametrize(("data", "stats"), [(True, False), (True, True), (False, False)])
def test_queued_copies_write_the_same_bytes_as_direct_writes(tmp_path, data, stats):
    _record_tiny(tmp_path / "direct", "auto", data=data, stats=stats)
    _record_tiny(tmp_path / "queued", "queue", data=data, stats=stats)
    for name in ("index.jsonl", "data.bin"):
        direct = (tmp_path / "direct" / name).read_bytes()
        assert (tmp_path / "queued" / name).read_bytes() == direct, name
    with open_dump(tmp_path / "queued") as dump:
        assert dump.complete and dump.steps == [0, 1, 2] and len(dump) > 50


def _host(sink: Sink, value: object) -> HostTensor:
    """The copy the recorder makes of a captured value for ``sink``."""
    return to_host(value, copy=not sink.direct, engine=sink.copies)


class SlowWriter(DumpWriter):
    """A disk that takes ``delay`` seconds per record."""

    delay = 0.01

    def write(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        time.sleep(self.delay)
        return super().write(*args, **kwargs)


def test_a_slow_writer_makes_the_engine_wait_within_the_bound(tmp_path):
    bound = 1 << 20  # above the largest tensor's buffer (one larger would go alone)
    sink = Sink(SlowWriter(tmp_path / "d"), max_pending_bytes=bound, max_pending_records=1000,
                copies="queue")
    sizes = [1000, 20_000, 70_000, 3, 40_000, 130_000] * 8  # float32 elements
    start = time.perf_counter()
    for i, n in enumerate(sizes):
        t = torch.full((n,), float(i))
        sink.put(f"t{i}", i // 6, 0, _host(sink, t))
        t.fill_(-1.0)  # the engine reuses its buffer at once: the copy was made
    queued_for = time.perf_counter() - start
    sink.close()
    pool = sink.copies.host
    assert sink.peak_pending <= bound and pool.pool.peak_live <= bound
    # the writer was behind: the queue filled up to near its bound, and buffers came back
    assert sink.peak_pending > bound - size_class(130_000 * 4)
    assert pool.pool.reused > 0 and pool.pool.live == 0
    assert queued_for > SlowWriter.delay * len(sizes) * 0.5  # the engine waited for the disk
    with open_dump(tmp_path / "d") as dump:
        assert dump.complete
        assert [r.name for r in dump] == [f"t{i}" for i in range(len(sizes))]
        for i, rec in enumerate(dump):
            values = dump.read(rec)
            assert values.shape == (sizes[i],) and (values == float(i)).all()


def test_the_count_bound_holds_for_tiny_records(tmp_path):
    sink = Sink(SlowWriter(tmp_path / "d"), max_pending_records=5, copies="queue")
    for i in range(60):
        sink.put(f"t{i}", 0, 0, _host(sink, torch.tensor([i], dtype=torch.int64)))
    sink.close()
    assert sink.peak_records == 5
    with open_dump(tmp_path / "d") as dump:
        assert [int(dump.read(r)[0]) for r in dump] == list(range(60))


def test_close_drains_the_queue(tmp_path):
    sink = Sink(SlowWriter(tmp_path / "d"), copies="queue")
    for i in range(40):
        sink.put(f"t{i}", i // 10, 0, _host(sink, torch.arange(i + 1, dtype=torch.float32)))
    assert sink.peak_records > 1  # still queued when close began
    sink.close()
    with open_dump(tmp_path / "d") as dump:
        assert dump.complete and dump.end["records"] == 40
        assert [dump.read(r).tolist() for r in dump] == [list(range(i + 1)) for i in range(40)]


def test_the_pool_reuses_buffers_and_keeps_few_idle():
    pool = HostPool(keep_bytes=3 * 4096)
    bufs = [pool.take(100) for _ in range(5)]
    assert pool.live == 5 * 4096 and pool.made == 5
    for b in bufs:
        pool.give(b)
    assert pool.live == 0
    again = [pool.take(4000) for _ in range(4)]
    assert pool.reused == 3 and pool.made == 6  # only three were kept idle
    assert all(b.numel() == 4096 for b in again)
    assert size_class(4097) == 4608 and size_class(1 << 20) == 1 << 20
    for n in (5000, 70_000, 1 << 20 | 1, 3_000_000):
        assert n <= size_class(n) <= n * 9 // 8 + 4096


def test_a_bad_copy_mode_is_a_usage_error_and_leaves_nothing(tmp_path):
    with pytest.raises(UsageError, match="copies must be one of"):
        with lockstep.record(tmp_path / "d", copies="fast"):
            pass
    assert not (tmp_path / "d").exists()


def _record_failing(path: Path, copies: str) -> list[str]:
    model = tiny("llama")

    def fail(*_: object) -> None:
        raise RuntimeError("boom in layer 1")

    model.model.layers[1].mlp.register_forward_hook(fail)  # before the recorder's hooks
    with pytest.raises(RuntimeError, match="boom"), torch.no_grad():
        with lockstep.record(path, meta={"created": 0}, copies=copies) as rec:
            rec.watch(model)
            model(torch.tensor([PROMPT]))
    with open_dump(path) as dump:
        assert dump.complete and dump.error == "RuntimeError: boom in layer 1"
        return [r.name for r in dump]


def test_an_exception_in_the_forward_keeps_every_record_before_it(tmp_path):
    names = _record_failing(tmp_path / "queued", "queue")
    assert names[-1] == "model.layers.1.mlp.down_proj" and "lm_head" not in names
    assert names == _record_failing(tmp_path / "direct", "auto")
    for name in ("index.jsonl", "data.bin"):
        assert (tmp_path / "queued" / name).read_bytes() == \
            (tmp_path / "direct" / name).read_bytes()


_WRITER_FAILS = textwrap.dedent("""
    import resource, signal, sys
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    import torch, lockstep
    from lockstep.errors import DumpWriteError
    resource.setrlimit(resource.RLIMIT_FSIZE, (300_000, 300_000))
    caught = None
    try:
        with lockstep.record(sys.argv[1], copies="queue") as rec:
            for i in range(200):
                with rec.step():
                    lockstep.probe("x", torch.full((20_000,), float(i)))
                    lockstep.probe("y", torch.full((10,), float(i)))
    except DumpWriteError as exc:
        caught = exc
    print(type(caught).__name__, i)
""")


def test_a_write_refused_on_the_writer_thread_reaches_the_engine(tmp_path):
    script = tmp_path / "child.py"
    script.write_text(_WRITER_FAILS)
    out = tmp_path / "d"
    res = subprocess.run([sys.executable, str(script), str(out)], capture_output=True,
                         text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    name, last = res.stdout.split()
    assert name == "DumpWriteError" and int(last) < 10  # raised soon, not at the end
    with open_dump(out) as dump:
        assert "File too large" in dump.error and len(dump) >= 2
        for rec in dump:
            assert (dump.read(rec) == float(rec.step)).all()


_KILLED = textwrap.dedent("""
    import sys, time
    import torch, lockstep
    with torch.no_grad(), lockstep.record(sys.argv[1], copies="queue") as rec:
        for step in range(1000):
            with rec.step():
                for i in range(20):
                    lockstep.probe(f"p{i}", torch.full((30_000,), float(step * 100 + i)))
                if step == 3:
                    print("mid step 3", flush=True)
                    time.sleep(60)  # the test kills us here, records of step 3 in flight
            print(f"step {step} done", flush=True)
""")


def test_a_kill_mid_step_keeps_every_finished_step(tmp_path):
    script = tmp_path / "child.py"
    script.write_text(_KILLED)
    out = tmp_path / "killed"
    kill_after(script, out, "mid step 3")
    with open_dump(out) as dump:
        assert not dump.complete
        assert dump.steps[:3] == [0, 1, 2] and set(dump.steps) <= {0, 1, 2, 3}
        for step in (0, 1, 2):
            got = [r.name for r in dump.in_step(step)]
            assert got == [f"p{i}" for i in range(20)]
        for rec in dump:  # whatever of step 3 the OS got is whole and in order
            assert (dump.read(rec) == float(rec.step * 100 + int(rec.name[1:]))).all()


def test_captures_return_while_the_writer_holds_records(tmp_path):
    """Only the writer thread waits for the disk: the engine's thread returns from every
    capture (torch tensors into pooled buffers, numpy arrays copied) while none is written."""
    gate = threading.Event()

    class HeldWriter(DumpWriter):
        def write(self, *args, **kwargs):  # type: ignore[no-untyped-def]
            gate.wait(30)
            return super().write(*args, **kwargs)

    sink = Sink(HeldWriter(tmp_path / "d"), copies="queue")
    for i in range(10):
        value = np.full(3, i, np.float32) if i % 2 else torch.full((3,), float(i))
        sink.put(f"t{i}", 0, 0, _host(sink, value))
    assert sink.peak_records == 10 and sink.writer.records == 0
    gate.set()
    sink.close()
    with open_dump(tmp_path / "d") as dump:
        assert [dump.read(r).tolist() for r in dump] == [[float(i)] * 3 for i in range(10)]


def test_slow_writer_errors_do_not_deadlock_a_full_queue(tmp_path):
    class Refusing(DumpWriter):
        n = 0

        def write(self, *args, **kwargs):  # type: ignore[no-untyped-def]
            Refusing.n += 1
            time.sleep(0.002)
            if Refusing.n == 3:
                raise DumpWriteError("cannot write the dump: refused")
            return super().write(*args, **kwargs)

    sink = Sink(Refusing(tmp_path / "d"), max_pending_bytes=64 << 10, copies="queue")
    with pytest.raises(DumpWriteError, match="refused"):
        for i in range(100):
            sink.put(f"t{i}", 0, 0, _host(sink, torch.zeros(8000)))
    sink.close()
    assert sink.pending_bytes == 0  # every reservation given back, also of failed records
    with open_dump(tmp_path / "d") as dump:
        assert [r.name for r in dump][:2] == ["t0", "t1"]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_side_stream_copies_match_blocking_copies_without_syncs(tmp_path):
    """On a CUDA machine: the side-stream path writes what blocking copies write, and adds
    no synchronising call that torch reports to those of the forward itself."""
    import warnings

    model = tiny("llama").cuda()
    ids = torch.tensor([PROMPT], device="cuda")

    def reported(copies: str | None) -> int:
        with warnings.catch_warnings(record=True) as caught, torch.no_grad():
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                if copies is None:
                    model(ids)
                else:
                    with lockstep.record(tmp_path / copies, meta={"created": 0},
                                         copies=copies) as rec:
                        rec.watch(model)
                        model(ids)
            finally:
                torch.cuda.set_sync_debug_mode("default")
        return sum("synchroniz" in str(w.message).lower() for w in caught)

    plain = reported(None)
    assert reported("auto") == plain
    assert reported("sync") > plain  # the count sees blocking copies
    for name in ("index.jsonl", "data.bin"):
        assert (tmp_path / "auto" / name).read_bytes() == (tmp_path / "sync" / name).read_bytes()
