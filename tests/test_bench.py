"""lockstep bench: the statistics, and real runs of transformers against the zoo's engine
(and llama.cpp) on tiny models, each engine in its own process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from lockstep.bench import ratio, summarize
from lockstep.bench.modules import kind_of
from lockstep.bench.run import prompt_of_length

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from lockstep.bench.run import run_bench  # noqa: E402


def test_summary_figures_and_interval():
    s = summarize([1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0, 9.0, 10.0])
    assert s.median == 5.5 and s.n == 10
    assert s.p10 == pytest.approx(1.9) and s.p90 == pytest.approx(9.1)
    assert s.low <= s.median <= s.high and s.low >= 1.0 and s.high <= 10.0
    assert s.noisy  # a spread this wide is noise, not a measurement


def test_a_run_whose_speed_changed_midway_is_noisy_though_each_half_is_steady():
    # what this project's VM does to a 2-thread torch forward: ~100 ms for a while, then
    # ~120 ms; within each half the CV is 1%, and over the run under 10%
    rng = np.random.default_rng(2)
    fast = 100 + rng.normal(0, 1, 15)
    slow = 108 + rng.normal(0, 1, 15)
    s = summarize(np.concatenate([fast, slow]))
    assert s.cv < 0.10 and s.drift == pytest.approx(0.08, abs=0.01)
    assert s.drifted and s.noisy
    assert list(s.samples[:3]) == list(fast[:3])  # kept in the order they were taken
    steady = summarize(np.concatenate([fast, fast + 1]))  # 1% apart: not a drift
    assert not steady.drifted and not steady.noisy
    assert summarize([100, 100, 100, 120, 120]).drift == 0.0  # too few samples to tell


def test_forks_widen_the_interval_to_what_another_process_gives():
    """Two processes whose medians are 3% apart, each steady (llama.cpp's six processes in a
    row on this project's VM: 94.7 to 99.0 ms, each one's interval about 1% wide): the
    two-stage interval spans both, where one drawn over the pooled samples does not, and
    the ratio's interval widens with it."""
    rng = np.random.default_rng(5)
    a, b = 95 + rng.normal(0, 0.5, 10), 98 + rng.normal(0, 0.5, 10)
    x, forks = np.concatenate([a, b]), [0] * 10 + [1] * 10
    pooled, forked = summarize(x), summarize(x, groups=forks)
    assert forked.median == pooled.median
    assert forked.fork_medians == (pytest.approx(np.median(a)), pytest.approx(np.median(b)))
    assert forked.low <= np.median(a) + 0.3 and forked.high >= np.median(b) - 0.3
    assert pooled.high - pooled.low < forked.high - forked.low
    # one process alone (--forks 1): its interval misses where the other process landed
    one = summarize(a)
    assert not one.low <= np.median(b) <= one.high and one.high - one.low < 1.0
    # a third process landing near either fork falls within the forked interval
    assert forked.low <= 95.2 <= forked.high and forked.low <= 97.8 <= forked.high
    steady = 50 + rng.normal(0, 0.2, 20)
    assert ratio(x, steady).high - ratio(x, steady).low < \
        ratio(x, steady, cand_groups=forks, ref_groups=forks).high \
        - ratio(x, steady, cand_groups=forks, ref_groups=forks).low
    assert summarize(x, groups=[0] * 20).fork_medians == ()  # one fork: as without
    assert not forked.forks_apart and not forked.noisy  # 3% apart: what processes do


def test_forks_far_apart_are_flagged_though_no_half_drifted():
    """This project's VM in one run: four forks at ~430 ms, the fifth at ~360 ms (it changed
    speed between processes). The halves' medians agree (no drift) and the CV is under 10%,
    but the forks are 17% apart: flagged, so the median is not held against another run's."""
    rng = np.random.default_rng(6)
    forks = [430.0, 432.0, 433.0, 426.0, 361.0]
    x = np.concatenate([f + rng.normal(0, 2, 2) for f in forks])
    s = summarize(x, groups=[i // 2 for i in range(10)])
    assert not s.drifted and s.cv < 0.10
    assert s.forks_apart and s.noisy and "forks 17% apart" in s.flags
    with pytest.raises(ValueError, match="fork labels"):
        summarize(x, groups=[0, 1])


def test_the_report_names_a_drifted_figure_and_says_why_it_is_noisy():
    from rich.console import Console

    from lockstep.bench.render import render
    from lockstep.bench.result import BenchResult, Figure

    rng = np.random.default_rng(3)
    steady = list(50 + rng.normal(0, 0.2, 20))
    drifting = list(100 + rng.normal(0, 0.5, 10)) + list(120 + rng.normal(0, 0.5, 10))
    result = BenchResult("hf:m", "zoo:m", settings={
        "iters": 20, "warmup": 2, "max_new_tokens": 4, "prompt_tokens": 6})
    result.figures.append(Figure.of("time to first token, 32 tokens", "ms", drifting, steady))
    console = Console(width=200, record=True, color_system=None)
    for part in render(result):
        console.print(part)
    text = " ".join(console.export_text().split())
    # 20 ms of a 110 ms median; the CV (9%) alone would not have said it
    assert "drifted +18%" in text and "noisy drifted" not in text
    assert "NOISY:" in text and "changed speed during the run" in text
    result.figures[0] = Figure.of("time to first token, 32 tokens", "ms", steady, steady)
    console = Console(width=200, record=True, color_system=None)
    for part in render(result):
        console.print(part)
    assert "NOISY" not in console.export_text() and "drifted" not in console.export_text()


def test_steady_samples_are_not_noisy_and_the_ratio_has_its_interval():
    rng = np.random.default_rng(1)
    ref = 10.0 + rng.normal(0, 0.05, 200)
    cand = 20.0 + rng.normal(0, 0.1, 200)
    assert not summarize(ref).noisy
    r = ratio(cand, ref)
    assert r.low < 2.0 < r.high and r.high - r.low < 0.05
    same = ratio(ref, ref)
    assert same.value == 1.0 and same.low <= 1.0 <= same.high


def test_module_kinds_from_names_and_classes():
    cases = {
        ("model.layers.3.self_attn", "LlamaAttention"): "attention",
        ("model.layers.3.self_attn.q_norm", "Qwen3RMSNorm"): "norm",
        ("layers.1.feed_forward", "FeedForward"): "mlp",
        ("lm_head", "Linear"): "lm_head",
        ("model.embed_tokens", "Embedding"): "embedding",
        ("model.layers.0.self_attn.q_proj", "Linear"): None,
        # a MoE model's classes all say "Moe"; only its MoE block's parts are MoE kinds
        ("model.layers.0.mlp.experts", "Qwen3MoeExperts"): "experts",
        ("model.layers.1.mlp", "Qwen3MoeSparseMoeBlock"): "moe",
        ("model.layers.1.mlp.gate", "Qwen3MoeTopKRouter"): "router",
        ("model.layers.1.mlp.shared_expert", "Qwen2MoeMLP"): "shared_expert",
        ("model.layers.1.mlp.shared_expert_gate", "Linear"): "shared_expert",
        ("model.layers.1.block_sparse_moe.gate", "Linear"): "router",
        ("model.layers.1.self_attn", "Qwen3MoeAttention"): "attention",
        ("model.layers.0.mlp", "Qwen2MoeMLP"): "mlp",  # a dense layer
        ("model.layers.1.input_layernorm", "Qwen3MoeRMSNorm"): "norm",
        ("model.layers.1", "Qwen3MoeDecoderLayer"): None,
        ("layers.1.feed_forward", "MoEBlock"): "moe",  # the zoo's
    }
    assert {key: kind_of(*key) for key in cases} == cases


def test_prompt_of_length_repeats_real_tokens():
    assert prompt_of_length([5, 6, 7], 7) == [5, 6, 7, 5, 6, 7, 5]


def _save_tiny(directory: Path) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(
        vocab_size=320, hidden_size=128, intermediate_size=176, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
    )).save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return _save_tiny(tmp_path_factory.mktemp("bench") / "llama")


def test_bench_transformers_against_the_zoo(tiny):
    seen: list[str] = []
    result = run_bench(f"hf:{tiny}", f"zoo:{tiny}", [3, 17, 42, 7, 99], lengths=(16, 64, 200),
                       max_new_tokens=4, warmup=1, iters=4, modules=True, forks=2,
                       progress=lambda done, total, what: seen.append(what))
    names = [f.name for f in result.figures]
    assert names == ["time to first token, 16 tokens", "prompt tokens/s, 16 tokens",
                     "time to first token, 64 tokens", "prompt tokens/s, 64 tokens",
                     "decode ms/token", "decode tokens/s"]
    assert result.skipped == {"TTFT at 200 tokens": f"hf:{tiny} takes 128 positions"}
    for f in result.figures:
        assert f.reference.n == f.candidate.n == 4
        assert f.reference.median > 0 and f.candidate.median > 0
        assert f.ratio.low <= f.ratio.value <= f.ratio.high
    ttft = {f.name: f for f in result.figures}
    # a 64-token prefill does more work than a 16-token one, on both engines
    assert ttft["prompt tokens/s, 64 tokens"].reference.median > 0
    assert "fork 2 of 2: measuring" in seen and "fork 1 of 2: warming up" in seen
    assert result.settings["forks"] == 2  # 2 rounds in each of two processes
    assert all(len(f.reference.fork_medians) == 2 for f in result.figures)
    for side in ("reference", "candidate"):
        mem = result.memory[side]
        assert mem["rss_bytes"] > 50 * 2**20  # torch alone is more than that
        m = result.modules[side]
        assert m["available"] and m["clock"] == "perf_counter"
        assert {"attention", "mlp", "norm", "embedding"} <= set(m["by_kind"])
        rows = sum(m["by_kind"].values()) + m["outside_modules_ms"]
        assert rows == pytest.approx(m["hooked_ms"], rel=1e-9)  # one run's rows add up
        assert 0 < m["in_modules_ms"] <= m["hooked_ms"]
        assert m["in_modules_ms"] > 0.5 * m["hooked_ms"]  # most of a step is in the model
        assert any(key.startswith("1:") for key in m["by_layer"])  # layer 1's modules
    assert result.meta["reference"]["engine"] == "transformers"
    assert result.meta["candidate"]["engine"] == "zoo"
    json.dumps(result.to_json())  # plain data all through


def test_bench_modules_shows_moe_latency(tmp_path):
    """Qwen2-MoE (layer 0 dense, layer 1 routed experts and a shared expert), transformers
    against the zoo: the MoE block's router, experts, shared expert and own time each a kind."""
    from lockstep.bench.modules import module_times
    from lockstep.engines import open_engine
    from lockstep.zoo.moe import tiny_moe_model

    model = tiny_moe_model("qwen2_moe", tmp_path / "qwen2_moe")
    moe = ("router", "experts", "shared_expert", "moe")
    for spec in (f"hf:{model}", f"zoo:{model}"):  # in this process (run_bench's own test
        engine = open_engine(spec)                # runs them in theirs)
        engine.load()
        m = module_times(engine, [3, 17, 42, 7, 99], 2, iters=1, warmup=1)
        assert m["available"], m
        assert all(m["by_kind"].get(kind, 0) > 0 for kind in moe), m["by_kind"]
        assert m["by_kind"].get("mlp", 0) > 0  # layer 0's dense MLP stays mlp
        assert {f"1:{kind}" for kind in moe} <= set(m["by_layer"])
        assert not any(f"0:{kind}" in m["by_layer"] for kind in moe)
        rows = sum(m["by_kind"].values()) + m["outside_modules_ms"]
        assert rows == pytest.approx(m["hooked_ms"], rel=1e-9)


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "lockstep.cli.main", *args],
                          capture_output=True, text=True, timeout=600,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"})


def test_bench_cli_json_and_plot(tiny, tmp_path):
    got = _cli("bench", f"hf:{tiny}", f"zoo:{tiny}", "--tokens", "3,17,42", "--lengths", "8,32",
               "--max-new-tokens", "3", "--warmup", "1", "--iters", "4", "--forks", "2",
               "--modules", "--json", str(tmp_path / "b.json"), "--plot", str(tmp_path / "m.svg"))
    assert got.returncode == 0, got.stderr
    text = " ".join(got.stdout.split())
    assert "time to first token, 32 tokens" in text
    assert "cand/ref" in text and "the timing's own overhead is" in text
    data: dict[str, Any] = json.loads((tmp_path / "b.json").read_text())
    assert data["settings"]["iters"] == 4 and len(data["figures"]) == 6
    assert data["settings"]["forks"] == 2
    first = data["figures"][0]["reference"]
    assert first["ci"][0] <= first["median"] and len(first["samples"]) == 4
    assert len(first["fork_medians"]) == 2
    assert first["median"] == pytest.approx(float(np.median(first["samples"])))
    svg = ET.parse(tmp_path / "m.svg").getroot()
    assert svg.tag.endswith("svg")
    titles = [t.text for t in svg.iter("{http://www.w3.org/2000/svg}title")]
    assert any(t.startswith("reference attention:") for t in titles)
    assert any(t.startswith("candidate mlp:") for t in titles)


def test_bench_usage_errors_are_one_line(tiny):
    got = _cli("bench", f"hf:{tiny}", f"zoo:{tiny}", "--tokens", "3", "--plot", "x.svg")
    assert got.returncode == 2 and "add --modules" in got.stderr
    got = _cli("bench", f"hf:{tiny}", f"zoo:{tiny}", "--tokens", "3", "--iters", "1")
    assert got.returncode == 2 and "--iters must be at least 2" in got.stderr
    got = _cli("bench", f"hf:{tiny}", f"zoo:{tiny}", "--tokens", "3", "--iters", "9")
    assert got.returncode == 2 and "10 for 5 fork(s), not 9" in got.stderr  # the default 5
    got = _cli("bench", f"hf:{tiny}", f"zoo:{tiny}", "--tokens", "3", "--forks", "0")
    assert got.returncode == 2 and "--forks must be at least 1" in got.stderr
    assert "Traceback" not in got.stderr


def test_llamacpp_module_times_say_why_not(tmp_path):
    pytest.importorskip("llama_cpp")
    from lockstep.demo import find_smollm2

    gguf = find_smollm2()
    result = run_bench(f"llamacpp:{gguf}", f"llamacpp:{gguf}", [504, 3575, 282], lengths=(8,),
                       max_new_tokens=2, warmup=0, iters=2, modules=True, forks=1)
    m = result.modules["reference"]
    assert not m["available"] and "whole-eval timings only" in m["why"]
    assert result.figures[0].reference.median > 0
    assert result.memory["candidate"]["rss_bytes"] > 0


def test_module_breakdown_of_an_engine_with_decode_logits_alone(tmp_path):
    """A vLLM-shaped ``py:`` engine (fused projections, (normed, residual) norms, logits
    computed outside forward) with no step_times of its own: the breakdown times one
    generation, and its rows add up to that generation's time with hooks (they added up to
    more when the timer also saw the base step_times' second, estimating generation)."""
    from engines.nano_vllm import NanoEngine
    from lockstep.bench.modules import module_times
    from models import save_tiny

    engine = NanoEngine("py:nano", model=str(save_tiny("llama", tmp_path / "llama")))
    engine.load()
    calls: list[int] = []
    lm_head = engine.torch_module().lm_head
    lm_head.register_forward_hook(lambda *_: calls.append(1))
    m = module_times(engine, [3, 17, 42, 7, 99], 3, iters=3, warmup=1)
    assert m["available"], m
    assert len(calls) == (1 + 2 * 3) * 3  # warm-up, then plain and hooked runs: 3 steps each
    rows = sum(m["by_kind"].values())
    assert rows <= m["hooked_ms"]
    assert rows + m["outside_modules_ms"] == pytest.approx(m["hooked_ms"], rel=1e-9)
    assert m["by_kind"]["lm_head"] > 0 and m["by_kind"]["attention"] > 0
    assert m["by_class"]["LMHead"] > 0  # called outside forward, still timed


def test_module_timers_inside_a_compiled_model(recwarn):
    """The per-module timers' hooks run as plain Python inside a torch.compile'd model: each
    call of each module is timed under its parent call, with no Dynamo warning ('does not
    know how to trace the builtin time.perf_counter') and no recompiling on the second call
    (which took 255 ms there, against 1.5 ms)."""
    import torch

    from lockstep.bench.modules import _Timer

    class Net(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.layers = torch.nn.ModuleList(torch.nn.Linear(8, 8) for _ in range(2))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            for layer in self.layers:
                x = torch.relu(layer(x))
            return x

    net = Net()
    compiled = torch.compile(net, backend="eager", dynamic=True)
    timer = _Timer(net, False)
    try:
        for n in (3, 5):
            compiled(torch.ones(n, 8))
    finally:
        timer.remove()
    calls = timer.resolve()
    assert [(i, parent) for i, parent, _ in calls] == [(0, -1), (2, 0), (3, 0),
                                                       (0, -1), (2, 3), (3, 3)]
    assert all(seconds > 0 for _, _, seconds in calls)
    assert not [w for w in recwarn.list if "perf_counter" in str(w.message)]
