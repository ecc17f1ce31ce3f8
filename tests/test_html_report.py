"""The HTML report in a real browser: headless Chromium (Debian's ``chromium``, which
``make test`` installs through tools/ensure-chromium) driven over the DevTools protocol.

The comparison is real: the zoo's qwen3 engine with its ``blocked_qk_norm`` bug against
transformers (diverged at step 1, layer 0's q_norm), written by ``lockstep compare --html``.
A copy of both dumps with one tensor renamed to hold ``</script><script>...`` checks that
names from a dump are shown as text, never run.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import lockstep
from browser import Browser, chromium
from independent_writer import IndependentWriter

pytestmark = pytest.mark.usefixtures("one_thread")

EVIL = ('layers.1.up</script><script>window.pwned=1</script>'
        '<img src=x onerror="window.pwned=2">&amp;')


def cli(*args: str) -> subprocess.CompletedProcess:
    src = str(Path(lockstep.__file__).resolve().parents[1])
    env = {**os.environ, "PYTHONPATH": src, "COLUMNS": "120", "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-m", "lockstep.cli.main", *args],
                          capture_output=True, text=True, env=env)


@pytest.fixture(scope="module")
def browser():
    if chromium() is None:  # never skipped: make test installs it (tools/ensure-chromium)
        pytest.fail("no chromium on PATH: run tools/ensure-chromium (make test does)")
    with Browser() as b:
        yield b


@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
    from lockstep.zoo.score import run_zoo

    root = tmp_path_factory.mktemp("zoo")
    score = run_zoo(root, families=["qwen3"], bugs=["blocked_qk_norm"], controls=False)
    assert score.results[0].verdict == "diverged"
    return root / "qwen3" / "reference.lsd", root / "qwen3" / "blocked_qk_norm.lsd"


@pytest.fixture(scope="module")
def report(zoo, tmp_path_factory):
    out = tmp_path_factory.mktemp("html")
    res = cli("compare", str(zoo[0]), str(zoo[1]), "--html", str(out / "r.html"),
              "--json", str(out / "r.json"))
    assert res.returncode == 1, res.stdout + res.stderr
    return out / "r.html", json.loads((out / "r.json").read_text())


def _renamed(src: Path, dst: Path, old: str) -> Path:
    """A copy of a dump with the record ``old`` named EVIL."""
    with lockstep.open_dump(src) as dump:
        w = IndependentWriter(str(dst), meta=dict(dump.meta))
        for rec in dump:
            a = np.ascontiguousarray(dump.read(rec))
            w.tensor(EVIL if rec.name == old else rec.name, rec.step, str(a.dtype),
                     list(a.shape), raw=a.tobytes(), call=rec.call, stats=None)
        w.end()
    return dst


def test_loads_without_errors_or_requests(browser, report):
    path, _ = report
    html = path.read_text(encoding="utf-8")
    assert "http://" not in html.replace("http://www.w3.org/2000/svg", "")
    assert "https://" not in html
    page = browser.open(path.as_uri())
    assert page.eval("document.body.getAttribute('data-error')") is None
    assert page.console_errors() == []
    assert page.requests() == [path.as_uri()]  # the file itself, nothing else
    assert page.eval("document.querySelector('#verdict').textContent").lower().startswith(
        "diverged")


def test_first_divergence_cell_and_its_tooltip(browser, report):
    path, data = report
    fd = data["first_divergence"]
    assert (fd["step"], fd["canonical"]) == (1, "layers.0.q_norm")
    page = browser.open(path.as_uri())
    assert page.eval("document.getElementById('heatmap').getAttribute('data-step')") == "1"
    cell = page.eval("(() => { const c = document.getElementById('first-divergence');"
                     "return c && [c.getAttribute('data-layer'), c.getAttribute('data-op'),"
                     "c.closest('tr').firstChild.textContent] })()")
    assert cell == ["0", "q_norm", "layer 0"]
    assert page.eval("document.querySelectorAll('td.first').length") == 1
    page.hover("#first-divergence")
    tip = page.eval("(() => { const t = document.getElementById('tooltip');"
                    "return t.hidden ? null : t.textContent })()")
    assert tip is not None
    assert f"{fd['error']:.4g}" in tip
    assert fd["reference"] in tip and fd["candidate"] in tip and "jump" in tip
    assert f"{fd['metrics']['cosine']:.7g}" in tip
    # another step redraws the heatmap: no outline where the divergence is not
    page.eval("(() => { const s = document.getElementById('step-select'); s.value = '0';"
              "s.dispatchEvent(new Event('change')); })()")
    assert page.eval("document.getElementById('heatmap').getAttribute('data-step')") == "0"
    assert page.eval("document.getElementById('first-divergence')") is None


def test_search_filters_the_pairs_table(browser, report):
    path, data = report
    page = browser.open(path.as_uri())
    rows = "document.querySelectorAll('#pairs tbody tr:not([hidden])').length"
    assert page.eval(rows) == len(data["pairs"])
    page.eval("document.querySelector('#pairs input.search').focus()")
    page.send("Input.insertText", {"text": "Q_NORM"})
    want = [p for p in data["pairs"]
            if any("q_norm" in (p[k] or "").lower() for k in ("reference", "candidate",
                                                              "canonical"))]
    assert 0 < len(want) < len(data["pairs"])
    assert page.eval(rows) == len(want)
    shown = page.eval("[...document.querySelectorAll('#pairs tbody tr:not([hidden])')]"
                      ".map(r => r.children[1].textContent)")
    assert shown == [p["reference"] for p in want]
    # sorting by error puts the largest first (descending on a second click)
    page.eval("(() => { const th = [...document.querySelectorAll('#pairs th')]"
              ".find(h => h.textContent === 'rel. error'); th.click(); th.click(); })()")
    first = page.eval("document.querySelector('#pairs tbody tr:not([hidden])')"
                      ".children[1].textContent")
    assert first == max(want, key=lambda p: p["error"])["reference"]


def test_a_name_holding_script_is_text(browser, zoo, tmp_path):
    ref = _renamed(zoo[0], tmp_path / "ref", "model.layers.1.mlp.up_proj")
    cand = _renamed(zoo[1], tmp_path / "cand", "layers.1.feed_forward.w3")
    out = tmp_path / "evil.html"
    res = cli("compare", str(ref), str(cand), "--html", str(out), "--json",
              str(tmp_path / "evil.json"))
    assert res.returncode == 1, res.stdout + res.stderr
    paired = [p for p in json.loads((tmp_path / "evil.json").read_text())["pairs"]
              if p["reference"] == p["candidate"] == EVIL]
    assert paired
    assert "</script><script>window" not in out.read_text(encoding="utf-8")
    page = browser.open(out.as_uri())
    assert page.console_errors() == []
    assert page.requests() == [out.as_uri()]
    assert page.eval("typeof window.pwned") == "undefined"
    assert page.eval("document.scripts.length") == 2  # the data block and the page's script
    assert page.eval("document.querySelectorAll('#report img').length") == 0
    cells = page.eval(f"[...document.querySelectorAll('#pairs td')]"
                      f".filter(td => td.textContent === {json.dumps(EVIL)}).length")
    assert cells == 2 * len(paired)  # paired by name: the reference and candidate columns


def test_inspect_page_highlights_nan_and_inf(browser, tmp_path):
    import torch
    from safetensors.torch import save_file

    bad = torch.ones(4, 4)
    bad[1, 2] = float("nan")
    save_file({"model.embed_tokens.weight": torch.ones(8, 4), "model.layers.0.mlp.w": bad,
               "lm_head.weight": torch.full((8, 4), float("inf"))}, str(tmp_path / "m.safetensors"))
    out = tmp_path / "inspect.html"
    res = cli("inspect", str(tmp_path / "m.safetensors"), "--html", str(out))
    assert res.returncode == 1, res.stdout + res.stderr
    page = browser.open(out.as_uri())
    assert page.console_errors() == [] and page.requests() == [out.as_uri()]
    flagged = page.eval("[...document.querySelectorAll('#tensor-table tr.bad')]"
                        ".map(r => r.children[0].textContent).sort()")
    assert flagged == ["lm_head.weight", "model.layers.0.mlp.w"]


@pytest.mark.parametrize("engine, option, shown", [
    # transformers with one linear 1% off: the other way runs, and its error is a column
    ("precision.py:PrecisionEngine", "o_proj_scale=1.01", "cand op on ref input"),
    # a vLLM-shaped engine whose norm adds its residual: the other way is refused, and why
    ("nano_vllm.py:NanoEngine", "bug=swapped_kv_rows",
     "not run the other way: it takes a second activation")])
def test_replay_table_shows_the_other_way(browser, tmp_path, engine, option, shown):
    from models import save_tiny

    model = save_tiny("llama", tmp_path / "llama")
    spec = f"py:{Path(__file__).parent / 'engines' / engine}"
    res = cli("diff", f"hf:{model}", spec, "--cand-opt", f"model={model}", "--cand-opt",
              option, "--tokens", "3,17,42,7,99", "--out", str(tmp_path / "d"),
              "--html", str(tmp_path / "r.html"))
    assert res.returncode == 1, res.stdout + res.stderr
    page = browser.open((tmp_path / "r.html").as_uri())
    assert page.console_errors() == []
    table = page.eval("document.getElementById('replay-table').textContent")
    assert shown in table


def test_a_chunked_prefill_is_shown_with_the_chunk_it_diverges_in(browser, tmp_path):
    from models import save_tiny

    model = save_tiny("llama", tmp_path / "llama")
    spec = f"py:{Path(__file__).parent / 'engines' / 'nano_vllm.py'}:NanoEngine"
    res = cli("diff", f"hf:{model}", spec, "--cand-opt", f"model={model}", "--cand-opt",
              "prefill_chunk=2", "--cand-opt", "bug=chunk_causal", "--tokens", "3,17,42,7,99",
              "--decode", "2", "--no-replay", "--out", str(tmp_path / "d"), "--html",
              str(tmp_path / "r.html"))
    assert res.returncode == 1, res.stdout + res.stderr
    page = browser.open((tmp_path / "r.html").as_uri())
    assert page.console_errors() == []
    panel = page.eval("document.getElementById('chunks').textContent")
    assert "the candidate's steps 0-2 are one prefill fed in 3 chunks (2+2+1 tokens)" in panel
    assert "starts in the candidate's chunk 2 of 3 (step 1, tokens 2-3)" in panel
    steps = page.eval("document.getElementById('steps').textContent")
    assert "candidate step -> reference step 3->1, 4->2" in steps


def test_a_declared_precision_not_taken_is_said(browser, tmp_path):
    """The page says what the candidate declared and why it was not taken as noise."""
    from models import tiny
    from test_declared_precision import _record, _scaled

    ref = _record(tiny("llama"), tmp_path / "ref.lsd")
    cand = _record(_scaled(1.03), tmp_path / "cand.lsd", quantization="Q4_1")
    res = cli("compare", str(ref), str(cand), "--html", str(tmp_path / "r.html"))
    assert res.returncode == 1, res.stdout + res.stderr
    page = browser.open((tmp_path / "r.html").as_uri())
    assert page.console_errors() == []
    panel = page.eval("document.getElementById('precision').textContent")
    assert "the candidate declares quantization Q4_1, but every tensor of layer 0 agrees" \
        in panel, panel
