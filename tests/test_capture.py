"""Capture: module hooks, probes, function tracing, unmodified programs."""

from __future__ import annotations

import importlib
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

import lockstep
from lockstep.errors import UsageError

LOCKSTEP = str(Path(sys.executable).with_name("lockstep"))


class Tiny(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.fc1 = torch.nn.Linear(8, 16)
        self.act = torch.nn.ReLU()
        self.fc2 = torch.nn.Linear(16, 4)

    def forward(self, x):
        h = self.act(self.fc1(x))
        return self.fc2(h), h.sum()


def test_watch_names_outputs_and_steps(tmp_path):
    model = Tiny()
    x = torch.randn(3, 8)
    with lockstep.record(tmp_path / "d") as rec:
        rec.watch(model)
        lockstep.probe("input", x)
        out, _ = model(x)
        lockstep.probe("after", out)  # after the call returned: opens step 1
        model(x)
    with lockstep.open_dump(tmp_path / "d") as d:
        step0 = [r.name for r in d.in_step(0)]
        assert step0 == ["input", "fc1", "act", "fc2", ":0", ":1"]
        assert [r.name for r in d.in_step(1)] == ["after", "fc1", "act", "fc2", ":0", ":1"]
        np.testing.assert_array_equal(d.read(d.get(0, "fc2")), out.detach().numpy())
        assert d.get(0, ":1").shape == ()
        # the root returns fc2's output object itself: recorded once, pointed at twice
        assert d.get(0, ":0").offset == d.get(0, "fc2").offset is not None
        assert d.get(0, ":0").stats == d.get(0, "fc2").stats
        stats = d.stats(d.get(0, "act"))
        assert stats["min"] == 0.0 and stats["zero"] > 0 and stats["nan"] == 0


def test_hooks_removed_on_exception(tmp_path):
    model = Tiny()
    with pytest.raises(RuntimeError, match="boom"):
        with lockstep.record(tmp_path / "d") as rec:
            rec.watch(model)
            model(torch.randn(2, 8))
            raise RuntimeError("boom")
    assert not model._forward_hooks and not model.fc1._forward_hooks
    assert not model._forward_pre_hooks
    assert lockstep.capture.active() is None
    with lockstep.open_dump(tmp_path / "d") as d:
        assert d.complete and d.error == "RuntimeError: boom"
        assert len(d) == 5
    lockstep.probe("ignored", torch.ones(2))  # no recorder: a no-op


def test_include_exclude_and_inputs(tmp_path):
    model = Tiny()
    with lockstep.record(tmp_path / "d", exclude=["act"]) as rec:
        rec.watch(model, inputs=True, include=["fc*"])
        model(torch.randn(2, 8))
    with lockstep.open_dump(tmp_path / "d") as d:
        assert [r.name for r in d] == ["fc1:input.0", "fc1", "fc2:input.0", "fc2"]
        assert d.records[0].extra["role"] == "input"


def test_explicit_steps_and_call_index(tmp_path):
    with lockstep.record(tmp_path / "d") as rec:
        lockstep.probe("x", torch.zeros(2))
        lockstep.probe("x", torch.ones(2))
        rec.next_step()
        lockstep.probe("x", torch.full((2,), 2.0))
    with lockstep.open_dump(tmp_path / "d") as d:
        assert [(r.step, r.call) for r in d] == [(0, 0), (0, 1), (1, 0)]
        assert d.read(d.get(0, "x", call=1)).tolist() == [1.0, 1.0]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16,
                                   torch.float8_e4m3fn, torch.int64, torch.bool])
def test_dtypes_stored_as_is(tmp_path, dtype):
    t = (torch.arange(12, dtype=torch.float32).reshape(3, 4) / 3).to(dtype)
    with lockstep.record(tmp_path / "d"):
        lockstep.probe("t", t)
    with lockstep.open_dump(tmp_path / "d") as d:
        rec = d.records[0]
        assert rec.dtype == str(dtype).removeprefix("torch.")
        np.testing.assert_array_equal(d.read(rec), t.to(torch.float64).numpy())


def _write_pkg(root: Path) -> None:
    pkg = root / "vmpkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "ops.py").write_text(textwrap.dedent("""
        import torch

        def rms_norm(x, weight, eps=1e-6):
            return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight

        class Block:
            def forward(self, x):
                return x * 2
    """))
    (pkg / "engine.py").write_text(textwrap.dedent("""
        import torch
        from vmpkg.ops import rms_norm, Block

        def run(x):
            return Block().forward(rms_norm(x, torch.ones(x.shape[-1])))
    """))


def test_trace_function_imported_by_name_elsewhere(tmp_path, monkeypatch):
    _write_pkg(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    engine = importlib.import_module("vmpkg.engine")  # imports rms_norm by name, first
    ops = importlib.import_module("vmpkg.ops")
    original = engine.rms_norm
    x = torch.randn(2, 16)
    with lockstep.record(tmp_path / "d") as rec:
        info = rec.trace("vmpkg.ops:rms_norm")
        rec.trace("vmpkg.ops:Block.forward")
        result = engine.run(x)
    assert engine.rms_norm is original and ops.rms_norm is original  # restored
    assert info.file == str(tmp_path / "vmpkg" / "ops.py")
    assert "vmpkg.engine.rms_norm" in info.patched
    with lockstep.open_dump(tmp_path / "d") as d:
        names = [r.name for r in d]
        assert names == ["vmpkg.ops.rms_norm:arg.x", "vmpkg.ops.rms_norm:arg.weight",
                         "vmpkg.ops.rms_norm", "vmpkg.ops.Block.forward:arg.x",
                         "vmpkg.ops.Block.forward"]
        np.testing.assert_allclose(d.read(d.get(0, "vmpkg.ops.Block.forward")),
                                   result.numpy(), rtol=0, atol=0)
        assert d.meta["traced"][0]["file"].endswith("ops.py")


def test_trace_bad_spec_is_a_user_error(tmp_path):
    with lockstep.record(tmp_path / "d") as rec:
        with pytest.raises(UsageError, match="does not import"):
            rec.trace("no_such_module_xyz:f")
        with pytest.raises(UsageError, match="not found"):
            rec.trace("json:no_such_function")


def test_record_refuses_existing_dump(tmp_path):
    with lockstep.record(tmp_path / "d"):
        pass
    with pytest.raises(UsageError, match="already exists"):
        with lockstep.record(tmp_path / "d"):
            pass
    with lockstep.record(tmp_path / "d", overwrite=True):
        lockstep.probe("x", torch.ones(1))


def test_run_unmodified_program(tmp_path):
    _write_pkg(tmp_path)
    prog = tmp_path / "prog.py"
    prog.write_text(textwrap.dedent("""
        import sys
        import torch
        from vmpkg.engine import run

        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 2))
        x = torch.randn(3, 4)
        for _ in range(int(sys.argv[1])):
            x = torch.cat([x, model(x)], dim=-1)[:, :4]
        run(torch.randn(2, 16))
        print("done", sys.argv[1])
    """))
    out = subprocess.run([LOCKSTEP, "run", "--out", str(tmp_path / "d"), "--trace",
                          "vmpkg.ops:rms_norm", "--", "python", str(prog), "3"],
                         capture_output=True, text=True, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert "done 3" in out.stdout
    assert f"from {tmp_path / 'vmpkg' / 'ops.py'}" in out.stderr
    with lockstep.open_dump(tmp_path / "d") as d:
        assert d.complete
        assert d.steps == [0, 1, 2, 3]
        assert [r.name for r in d.in_step(0)] == ["0", "1", "2", ""]
        assert [r.name for r in d.in_step(3)][-1] == "vmpkg.ops.rms_norm"


def test_run_program_keeps_the_layers_and_names_asked_for(tmp_path):
    prog = tmp_path / "layers.py"
    prog.write_text("import torch\n"
                    "class Net(torch.nn.Module):\n"
                    "    def __init__(self):\n"
                    "        super().__init__()\n"
                    "        self.layers = torch.nn.ModuleList(torch.nn.Linear(2, 2) "
                    "for _ in range(3))\n"
                    "        self.head = torch.nn.Linear(2, 2)\n"
                    "    def forward(self, x):\n"
                    "        for layer in self.layers:\n"
                    "            x = layer(x)\n"
                    "        return self.head(x)\n"
                    "Net()(torch.ones(2))\n")
    out = subprocess.run([LOCKSTEP, "run", "--out", str(tmp_path / "d"), "--layers", "1-2",
                          "--exclude", "layers.2", "--", "python", str(prog)],
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    with lockstep.open_dump(tmp_path / "d") as d:
        assert sorted(r.name for r in d) == ["", "head", "layers.1"]
    out = subprocess.run([LOCKSTEP, "run", "--out", str(tmp_path / "e"), "--include", "head",
                          "--", "python", str(prog)], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr  # --include: --select's older spelling
    with lockstep.open_dump(tmp_path / "e") as d:
        assert [r.name for r in d] == ["head"]


def test_run_program_failure_keeps_dump(tmp_path):
    prog = tmp_path / "bad.py"
    prog.write_text("import torch\nm = torch.nn.Linear(2, 2)\nm(torch.ones(2))\n"
                    "raise SystemExit(3)\n")
    out = subprocess.run([LOCKSTEP, "run", "--out", str(tmp_path / "d"), "--", "python",
                          str(prog)], capture_output=True, text=True)
    assert out.returncode == 3
    with lockstep.open_dump(tmp_path / "d") as d:
        assert [r.name for r in d] == [""] and d.meta["exit_code"] == 3


def test_in_place_change_is_not_taken_for_an_alias(tmp_path):
    t = torch.zeros(4)
    with lockstep.record(tmp_path / "d"):
        lockstep.probe("before", t)
        t.add_(1.0)
        lockstep.probe("after", t)
        lockstep.probe("again", t)
    with lockstep.open_dump(tmp_path / "d") as d:
        assert d.read(d.get(0, "before")).tolist() == [0.0] * 4
        assert d.read(d.get(0, "after")).tolist() == [1.0] * 4
        assert d.get(0, "again").offset == d.get(0, "after").offset != d.get(0, "before").offset


def test_stats_left_out_are_computed_by_the_reader(tmp_path):
    t = torch.tensor([[1.0, -3.0], [0.0, 2.0]])
    with lockstep.record(tmp_path / "lazy"):
        lockstep.probe("t", t)
    with lockstep.record(tmp_path / "eager", stats=True):
        lockstep.probe("t", t)
    with lockstep.open_dump(tmp_path / "lazy") as lazy, \
            lockstep.open_dump(tmp_path / "eager") as eager:
        assert lazy.records[0].stats is None
        assert eager.records[0].stats["min"] == -3.0
        assert lazy.stats(lazy.records[0]) == eager.records[0].stats


def test_numpy_array_changed_in_place_is_recorded_again(tmp_path):
    a = np.zeros(3, dtype=np.float32)
    with lockstep.record(tmp_path / "d"):
        lockstep.probe("a", a)
        a += 1
        lockstep.probe("b", a)
    with lockstep.open_dump(tmp_path / "d") as d:
        assert d.read(d.get(0, "a")).tolist() == [0.0] * 3
        assert d.read(d.get(0, "b")).tolist() == [1.0] * 3


# -- the recorder's public surface: capture, wants, step, add_undo -------------------------------

def test_add_undo_runs_on_exception_last_first_and_once(tmp_path):
    ran: list[str] = []
    with pytest.raises(RuntimeError, match="boom"):
        with lockstep.record(tmp_path / "d") as rec:
            rec.add_undo(lambda: ran.append("first"))
            early = rec.add_undo(lambda: ran.append("early"))
            rec.add_undo(lambda: ran.append("last"))
            early()  # undone now: the close does not run it again
            early()
            assert ran == ["early"]
            raise RuntimeError("boom")
    assert ran == ["early", "last", "first"]


def test_wants_honours_include_and_exclude(tmp_path):
    with lockstep.record(tmp_path / "d", include=["model.*"], exclude=["*.mlp"]) as rec:
        assert rec.selective
        assert rec.wants("model.layers.0") and rec.wants("model.norm")
        assert not rec.wants("model.layers.0.mlp")  # excluded
        assert not rec.wants("lm_head")  # not included
        lockstep.probe("lm_head", torch.ones(2))  # probes ask wants() too
        lockstep.probe("model.norm", torch.ones(2))
    with lockstep.record(tmp_path / "e") as rec:
        assert not rec.selective and rec.wants("anything")
    with lockstep.open_dump(tmp_path / "d") as d:
        assert [r.name for r in d] == ["model.norm"]


def test_step_scope_nested_entries_do_not_advance(tmp_path):
    model = Tiny()
    with lockstep.record(tmp_path / "d") as rec:
        rec.watch(model)
        for expected in range(2):
            with rec.step() as step:
                assert step == expected and rec.in_step
                lockstep.probe("x", torch.ones(2))
                with rec.step() as inner:  # nested: the same step
                    assert inner == expected
                    lockstep.probe("x", torch.ones(2))
                assert rec.step() == expected  # a plain call inside the scope neither
                model(torch.randn(1, 8))  # nor a watched root's call advances
            assert not rec.in_step
        lockstep.probe("after", torch.ones(2))  # the scope was left: opens the next step
    with lockstep.open_dump(tmp_path / "d") as d:
        assert d.steps == [0, 1, 2]
        assert [(r.name, r.call) for r in d.in_step(1)] == [
            ("x", 0), ("x", 1), ("fc1", 0), ("act", 0), ("fc2", 0), (":0", 0), (":1", 0)]
        assert [r.name for r in d.in_step(2)] == ["after"]


def test_step_scope_is_on_disk_when_left(tmp_path):
    with lockstep.record(tmp_path / "d") as rec:
        with rec.step():
            lockstep.probe("x", torch.ones(2))
        index = (tmp_path / "d" / "index.jsonl").read_text()
        assert '"name":"x"' in index  # flushed on leaving the scope, before the close


def test_rope_patch_is_on_the_undo_list(tmp_path):
    from lockstep.engines.hf_rope import watch_rope
    from models import tiny

    model = tiny("llama")
    modeling = sys.modules[type(model).__module__]
    original = modeling.apply_rotary_pos_emb
    with lockstep.record(tmp_path / "d") as rec:
        scope = watch_rope(rec, model)
        assert scope.__enter__() is True  # never left: the recording's close undoes it
        assert modeling.apply_rotary_pos_emb is not original
        with torch.no_grad():
            model(torch.tensor([[3, 17, 42]]))
    assert modeling.apply_rotary_pos_emb is original
    assert not any(m._forward_pre_hooks for m in model.modules())
    with lockstep.open_dump(tmp_path / "d") as d:
        assert [r.name for r in d] == ["model.layers.0.self_attn.rope:0",
                                       "model.layers.0.self_attn.rope:1",
                                       "model.layers.1.self_attn.rope:0",
                                       "model.layers.1.self_attn.rope:1"]


def test_a_probe_inside_compiled_code_records_the_real_values(tmp_path):
    """lockstep.probe inside a torch.compile'd function runs as plain Python (a graph break),
    on the real tensor, at each call; the function's result is unchanged."""

    @torch.compile(backend="eager", dynamic=True)
    def double_then_add(x: torch.Tensor) -> torch.Tensor:
        y = lockstep.probe("doubled", x * 2)
        return y + 1

    xs = [torch.arange(n, dtype=torch.float32) for n in (3, 5)]
    with lockstep.record(tmp_path / "d") as rec:
        for x in xs:
            with rec.step():
                assert torch.equal(double_then_add(x), x * 2 + 1)
    with lockstep.open_dump(tmp_path / "d") as dump:
        got = [dump.read(r) for r in dump.records if r.name == "doubled"]
    assert [g.tolist() for g in got] == [(x * 2).tolist() for x in xs]


def test_run_program_records_a_compiled_model(tmp_path):
    """`lockstep run` of an unmodified program that compiles its model: the hook that finds
    the root module runs as plain Python inside compiled code too, and the records carry
    the uncompiled names. The program's own output is unchanged."""
    prog = tmp_path / "compiled.py"
    prog.write_text("import torch\n"
                    "torch.manual_seed(0)\n"
                    "class Net(torch.nn.Module):\n"
                    "    def __init__(self):\n"
                    "        super().__init__()\n"
                    "        self.layers = torch.nn.ModuleList(torch.nn.Linear(4, 4) "
                    "for _ in range(2))\n"
                    "    def forward(self, x):\n"
                    "        for layer in self.layers:\n"
                    "            x = torch.relu(layer(x))\n"
                    "        return x\n"
                    "net = torch.compile(Net(), backend='eager', dynamic=True)\n"
                    "for n in (3, 5):\n"
                    "    print(round(float(net(torch.ones(n, 4)).sum()), 4))\n")
    plain = subprocess.run([sys.executable, str(prog)], capture_output=True, text=True)
    out = subprocess.run([LOCKSTEP, "run", "--out", str(tmp_path / "d"), "--", "python",
                          str(prog)], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines()[:2] == plain.stdout.splitlines()[:2]
    with lockstep.open_dump(tmp_path / "d") as d:
        names = {r.name for r in d}
        assert {"layers.0", "layers.1"} <= names and not any("_orig_mod" in n for n in names)
        assert [r.shape for r in d if r.name == "layers.1"] == [(3, 4), (5, 4)]


def test_a_fullgraph_compiled_model_is_refused_with_what_to_do(tmp_path):
    """fullgraph=True (vLLM's compile) refuses the graph break a recording needs: Dynamo's
    error names lockstep's function and says what to do, rather than failing inside the
    recorder's internals."""
    net = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.ReLU())
    compiled = torch.compile(net, backend="eager", fullgraph=True)
    with lockstep.record(tmp_path / "d") as rec:
        rec.watch(net)
        with pytest.raises(Exception) as caught:
            compiled(torch.ones(2, 4))
    text = str(caught.value)
    assert "lockstep_records_here" in text and "enforce_eager=True" in text
