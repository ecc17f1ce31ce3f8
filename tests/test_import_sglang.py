"""``lockstep import sglang``: dumps SGLang's dumper wrote, read into lockstep dumps and compared
with transformers like any other engine's.

The engine is tests/engines/nano_vllm.py (vLLM's and SGLang's shapes: fused qkv_proj and
gate_up_proj, norms returning (normed, residual), logits computed outside forward), its
tensors dumped the way SGLang's dumper writes them (tests/engines/sglang_dumper.py: one
``torch.save``'d file per tensor, named by its tags), current and older formats.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import lockstep
from engines.nano_vllm import LLM
from engines.sglang_dumper import SGLangStyleDumper
from lockstep.errors import UsageError
from lockstep.importers.sglang import import_sglang
from lockstep.workflows.capture import capture
from models import save_tiny

PROMPT = [3, 17, 42, 7, 99, 5, 64, 11, 200]
DECODE = 2

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = tmp_path_factory.mktemp("sglang")
    model = save_tiny("llama", root / "llama")
    ref = root / "ref.lsd"
    tokens = capture(f"hf:{model}", str(ref), tokens=PROMPT, decode=DECODE)
    return {"root": root, "model": model, "ref": ref, "tokens": tokens}


def _dumped(setup: dict, out: Path, *, bug: str | None = None, legacy: bool = False) -> Path:
    """The nano engine's greedy run, fed the reference's tokens, dumped SGLang's way."""
    llm = LLM(setup["model"], bug=bug)
    dumper = SGLangStyleDumper(out, legacy=legacy)
    dumper.watch(llm.model)
    with torch.no_grad():
        llm.generate(list(PROMPT), DECODE, forced=setup["tokens"][:DECODE])
    dumper.remove()
    return out


def _cli(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-m", "lockstep", *map(str, args)],
                          capture_output=True, text=True, env=env, timeout=300)


@pytest.mark.parametrize("legacy", [False, True], ids=["current", "legacy"])
def test_an_sglang_dump_imports_and_matches_transformers(tmp_path, setup, legacy):
    src = _dumped(setup, tmp_path / "dumper", legacy=legacy)
    done = _cli("import", "sglang", src, "--out", tmp_path / "c.lsd")
    assert done.returncode == 0, done.stderr
    files = len(list((src / "dump_20251201_120000_000000").iterdir()))
    assert f"{files} files" in done.stdout and f"{DECODE + 1} steps" in done.stdout, done.stdout
    with lockstep.open_dump(tmp_path / "c.lsd") as dump:
        assert dump.meta["engine"] == "sglang" and dump.steps == [0, 1, 2]
        names = {r.name for r in dump if r.step == 0}
        # module outputs under the module's name, a tuple's tensors as name:K
        assert {"input_ids", "positions", "model.layers.0.self_attn.qkv_proj",
                "model.layers.1.input_layernorm:0", "model.layers.1.input_layernorm:1",
                "lm_head"} <= names, sorted(names)
        # a tensor saved twice (the residual a layer passes on) points at one copy, as in a
        # recording of the program; before (and before model.norm:1 was paired as the last
        # layer's output), each was a copy of its own, and transformers' layer 1 output was
        # paired with the residual (structure, 0.12): DIVERGED
        at = [dump.get(0, n).offset for n in ("model.layers.1:1",
                                               "model.layers.1.post_attention_layernorm:1")]
        assert at[0] == at[1]
    result = lockstep.compare(setup["ref"], tmp_path / "c.lsd")
    assert result.verdict == "match", (result.first_divergence, result.coverage.gaps)


def test_a_bug_in_the_sglang_dump_is_found_where_it_is(tmp_path, setup):
    """The engine's layer 1 left unloaded: diverged at layer 1, everything before agrees."""
    src = _dumped(setup, tmp_path / "dumper", bug="layer_not_loaded")
    import_sglang(src, tmp_path / "c.lsd")
    result = lockstep.compare(setup["ref"], tmp_path / "c.lsd")
    first = result.first_divergence
    assert result.verdict == "diverged" and first is not None
    assert first.step == 0 and ".layers.1." in first.ref_name, first


def test_several_ranks_become_a_multi_rank_recording(tmp_path, setup):
    """Rank 0 and rank 1 each dump the same run (replicated): one dump per rank under the
    output, merged by compare."""
    exp = "dump_20251201_120000_000000"
    for rank in (0, 1):
        llm = LLM(setup["model"])
        dumper = SGLangStyleDumper(tmp_path / "dumper", rank=rank, world_size=2, exp_name=exp)
        dumper.watch(llm.model)
        with torch.no_grad():
            llm.generate(list(PROMPT), DECODE, forced=setup["tokens"][:DECODE])
        dumper.remove()
    result = import_sglang(tmp_path / "dumper", tmp_path / "c")
    assert result.ranks == 2 and (tmp_path / "c" / "ranks.json").is_file()
    comparison = lockstep.compare(setup["ref"], tmp_path / "c")
    assert comparison.verdict == "match", comparison.first_divergence
    assert comparison.ranks is not None


def _tp_run(out: Path, dims: bool) -> Path:
    """Two ranks of a tensor-parallel step dumped SGLang's way: an attention output split on
    its last dim (``dims="t h[tp]"``), a down projection's partial sums (``"t h[tp:partial]"``)
    and a replicated hidden state."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(6, 8, generator=gen)
    part = torch.randn(6, 8, generator=gen)
    exp = "dump_20251201_120000_000000"
    for rank in (0, 1):
        dumper = SGLangStyleDumper(out, rank=rank, world_size=2, exp_name=exp)
        dumper.dump("hidden", x)
        dumper.dump("attn_out", x[:, 4 * rank:4 * rank + 4],
                    meta={"dims": "t h[tp]"} if dims else None)
        dumper.dump("down", part if rank == 0 else x - part,
                    meta={"dims": "t h[tp:partial]"} if dims else None)
    return out


def test_two_tensor_parallel_runs_merge_by_their_dims_annotations(tmp_path):
    """Both sides SGLang runs at TP=2 (its own comparator's case): each side's ranks are merged
    with no single-rank record to detect the rule against, so the ``dims`` annotations decide
    (``[tp]``: concatenated on that dim; ``[tp:partial]``: summed). Without them the split and
    summed tensors cannot be told apart and the comparison is INCOMPLETE, never a match."""
    for side in ("baseline", "target"):
        import_sglang(_tp_run(tmp_path / side, dims=True), tmp_path / f"{side}.lsd")
    result = lockstep.compare(tmp_path / "baseline.lsd", tmp_path / "target.lsd")
    assert result.verdict == "match", (result.coverage.gaps, result.ranks)
    assert result.ranks is not None
    rules = {(m.name, m.rule, m.how) for m in result.ranks.sides[0].merges}
    assert rules == {("hidden", "replicated", "detected"), ("attn_out", "col", "annotated"),
                     ("down", "row", "annotated")}
    for side in ("plain-baseline", "plain-target"):
        import_sglang(_tp_run(tmp_path / side, dims=False), tmp_path / f"{side}.lsd")
    plain = lockstep.compare(tmp_path / "plain-baseline.lsd", tmp_path / "plain-target.lsd")
    assert plain.verdict == "incomplete"


def test_a_file_that_is_not_tensors_is_skipped_never_unpickled(tmp_path, setup):
    """A dumper file holding a pickled object of another class is not run: torch.load with
    weights_only refuses it, and the import skips it and says so."""
    src = _dumped(setup, tmp_path / "dumper")
    exp = src / "dump_20251201_120000_000000"
    marker = tmp_path / "ran"
    bad = exp / "step=0___rank=0___dump_index=999___name=evil.pt"
    torch.save({"value": _Payload(str(marker)), "meta": {}}, bad)
    result = import_sglang(src, tmp_path / "c.lsd")
    assert not marker.exists()
    assert [name for name, _ in result.skipped] == [bad.name]
    assert "not readable as tensors" in result.skipped[0][1]


class _Payload:
    """An object whose unpickling would create ``path``."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self) -> tuple:
        return (Path.touch, (Path(self.path),))


def test_a_directory_with_no_dumper_files_is_a_clear_error(tmp_path):
    (tmp_path / "empty").mkdir()
    done = _cli("import", "sglang", tmp_path / "empty", "--out", tmp_path / "c.lsd")
    assert done.returncode == 2
    assert "holds no SGLang dumper files" in done.stderr and "Traceback" not in done.stderr
    with pytest.raises(UsageError, match="is not a directory"):
        import_sglang(tmp_path / "missing", tmp_path / "c.lsd")
