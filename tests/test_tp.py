"""Tensor-parallel runs: one dump per rank, merged by compare before it compares.

The real test runs a tensor-parallel Llama (tests/engines/tp_llama.py) under torch.distributed
with the gloo backend, 2 processes on CPU, against transformers at TP=1. The rules themselves
(row against a bad replica, what cannot be told, a mapping file's rule) are checked on dumps
written rank by rank in one process.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

import lockstep
from engines import tp_llama
from lockstep.align.mapping import load_mapping
from lockstep.store.ranks import MANIFEST_FILE, manifest, rank_dir
from lockstep.workflows.capture import capture
from models import save_tiny
from test_coverage_verdict import cli

PROMPT = [3, 17, 42, 7, 99, 5, 64, 11, 200]

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tp(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """transformers' dump of a tiny Llama, and 2-rank recordings of the TP engine: bug-free
    and with rank 1 loading the wrong shard of q_proj (one spawn of 2 gloo processes)."""
    root = tmp_path_factory.mktemp("tp")
    model = save_tiny("llama", root / "llama")
    ref = root / "ref"
    tokens = capture(f"hf:{model}", str(ref), tokens=PROMPT, decode=1)
    out = {"ref": ref, "good": root / "good", "bug": root / "bug"}
    tp_llama.run(model, [(out["good"], None), (out["bug"], "shard_offset")], PROMPT,
                 tokens[:1])
    return out


def flat(text: str) -> str:
    """The terminal report's words, without its panel borders and line wrapping."""
    return " ".join(text.replace("│", " ").split())


def test_each_rank_writes_its_own_complete_dump(tp):
    assert json.loads((tp["good"] / MANIFEST_FILE).read_text())["world_size"] == 2
    for rank in (0, 1):
        with lockstep.open_dump(rank_dir(tp["good"], rank)) as d:
            assert d.complete and (d.meta["rank"], d.meta["world_size"]) == (rank, 2)
            q = d.get(0, "model.layers.0.self_attn.q_proj")
            assert q is not None and q.shape == (1, 9, 64)  # this rank's half of the heads
            probed = d.get(0, "model.layers.0.self_attn.o_proj:input.0")
            assert probed is not None and probed.extra["shard"] == ["col", -1]


def test_bug_free_tp_matches_transformers_and_says_how_ranks_merged(tp, tmp_path):
    c = lockstep.compare(tp["ref"], tp["good"])
    assert c.verdict == "match", (c.first_divergence, c.coverage)
    assert c.ranks is not None
    (side,) = c.ranks.sides
    assert side.side == "candidate" and side.world_size == 2 and not side.undecided
    rules = {(m.name, m.step): (m.rule, m.how) for m in side.merges}
    assert rules[("model.layers.0.self_attn.q_proj", 0)] == ("col", "detected")
    assert rules[("model.layers.1.mlp.act_fn", 1)] == ("col", "detected")
    assert rules[("model.layers.0.self_attn.o_proj:input.0", 0)] == ("col", "annotated")
    assert rules[("model.layers.0.self_attn.o_proj", 0)] == ("row", "detected")
    assert rules[("model.layers.1.mlp.down_proj", 1)] == ("row", "detected")
    assert rules[("model.layers.0.self_attn:0", 0)] == ("replicated", "detected")
    assert rules[(":logits", 0)] == ("replicated", "detected")
    merged = {p.ref_name: p for p in c.results if p.step == 0}
    assert merged["model.layers.0.self_attn.q_proj"].cand_shape == (1, 9, 128)
    assert merged["model.layers.0.self_attn.o_proj"].error < 1e-5  # the two partial sums
    proc = cli("compare", str(tp["ref"]), str(tp["good"]), "--json", str(tmp_path / "r.json"))
    assert proc.returncode == 0, proc.stderr
    text = flat(proc.stdout)
    assert "the candidate has 2 ranks, merged per record:" in text
    assert "row (detected)" in text and "col (annotated)" in text
    report = json.loads((tmp_path / "r.json").read_text())
    merges = report["ranks"]["sides"][0]["merges"]
    assert {"name": "model.layers.0.self_attn.o_proj", "step": 0, "rule": "row",
            "how": "detected"}.items() <= next(
        m for m in merges if (m["name"], m["step"]) == ("model.layers.0.self_attn.o_proj", 0)
    ).items()


def test_a_wrong_shard_offset_on_rank_1_diverges_there_and_names_rank_1(tp, tmp_path):
    c = lockstep.compare(tp["ref"], tp["bug"])
    assert c.verdict == "diverged"
    assert c.first_divergence is not None
    assert (c.first_divergence.step, c.first_divergence.ref_name) == \
        (0, "model.layers.0.self_attn.q_proj")
    assert c.ranks is not None and c.ranks.blamed == (1,)
    errors = dict(c.ranks.shard_errors)
    assert errors[0] < 1e-5 < 0.1 < errors[1]  # rank 0's half is right
    proc = cli("compare", str(tp["ref"]), str(tp["bug"]), "--json", str(tmp_path / "r.json"))
    assert proc.returncode == 1, proc.stderr
    assert "the error lies in the shard of candidate rank 1 (indices 64-127 of dim 2" in \
        flat(proc.stdout)
    ranks = json.loads((tmp_path / "r.json").read_text())["ranks"]
    assert ranks["blamed_ranks"] == [1]
    assert ranks["merged_as"].startswith("the first divergence, model.layers.0.self_attn.q_proj@0,"
                                         " is the candidate's 2 ranks merged as col (detected")


def test_a_missing_rank_dump_is_a_one_line_error(tp, tmp_path):
    cand = tmp_path / "cand"
    shutil.copytree(tp["good"], cand)
    shutil.rmtree(cand / "rank1")
    proc = cli("compare", str(tp["ref"]), str(cand))
    assert proc.returncode == 2
    assert proc.stderr.startswith("lockstep: error: ") and proc.stderr.count("\n") == 1
    assert "rank 1 of 2 wrote no dump" in proc.stderr
    # a command that reads one dump says what the directory is and where a rank's dump is
    proc = cli("show", str(tp["good"]))
    assert proc.returncode == 2 and "a multi-rank recording" in proc.stderr
    assert str(tp["good"] / "rank0") in proc.stderr


@pytest.mark.parametrize("text", ['{"format": "lockstep-ranks", "world_size": "2"}',
                                  '{"format": "lockstep-ranks", "world_size": 1e9}', "[2]",
                                  "not json"])
def test_a_hostile_ranks_manifest_is_a_dump_error(tmp_path, text):
    ref = single(tmp_path / "ref", {"h": X})
    cand = ranked(tmp_path / "cand", [{"h": X}, {"h": X}])
    (cand / MANIFEST_FILE).write_text(text)
    with pytest.raises(lockstep.DumpError, match="ranks manifest"):
        lockstep.compare(ref, cand)


def test_a_rank_dump_cut_short_is_incomplete_never_match(tp, tmp_path):
    cand = tmp_path / "cand"
    shutil.copytree(tp["good"], cand)
    index = cand / "rank1" / "index.jsonl"
    data = index.read_bytes()
    index.write_bytes(data[:len(data) // 2])  # the writer killed halfway: a torn index
    c = lockstep.compare(tp["ref"], cand)
    assert c.verdict == "incomplete"
    assert c.coverage is not None and any(g.what == "ranks" for g in c.coverage.gaps)
    assert c.ranks is not None and c.ranks.sides[0].undecided
    assert "rank 1 has no record of it" in c.ranks.sides[0].undecided[0].why
    assert cli("compare", str(tp["ref"]), str(cand)).returncode == 3


# -- the rules on dumps written rank by rank -------------------------------------------------

X = np.linspace(-1.0, 1.0, 48, dtype=np.float32).reshape(6, 8)


def ranked(path: Path, per_rank: list[dict[str, np.ndarray]]) -> Path:
    """A multi-rank recording written as torch.distributed ranks would, one dump each."""
    path.mkdir()
    (path / MANIFEST_FILE).write_text(json.dumps(manifest(len(per_rank))))
    for rank, records in enumerate(per_rank):
        meta = {"rank": rank, "world_size": len(per_rank)}
        with lockstep.record(rank_dir(path, rank), meta=meta) as rec:
            for name, arr in records.items():
                rec.capture(name, arr)
    return path


def single(path: Path, records: dict[str, np.ndarray]) -> Path:
    with lockstep.record(path) as rec:
        for name, arr in records.items():
            rec.capture(name, arr)
    return path


def test_a_replica_that_differs_is_compared_and_named(tmp_path):
    ref = single(tmp_path / "ref", {"h": X, "o": X * 2})
    bad = X.copy()
    bad[0, 0] += 0.5
    cand = ranked(tmp_path / "cand", [{"h": X, "o": X * 2}, {"h": bad, "o": X * 2}])
    c = lockstep.compare(ref, cand)
    assert c.verdict == "diverged" and c.first_divergence is not None
    assert c.first_divergence.ref_name == "h"  # rank 1's replica, not rank 0's good one
    assert c.ranks is not None
    (finding,) = c.ranks.sides[0].replica_findings
    assert finding.name == "h" and [r for r, _ in finding.differs] == [1]
    assert finding.compared_rank == 1
    assert c.ranks.merged_as is not None and \
        "h@0, is the candidate's 2 ranks merged as replicated (detected" in c.ranks.merged_as
    assert any("differs across the candidate's ranks: rank 1" in line
               for line in c.ranks.lines())


def test_partial_sums_are_told_from_replicas_by_the_reference(tmp_path):
    rng = np.random.default_rng(0)
    part = rng.standard_normal(X.shape).astype(np.float32)
    ref = single(tmp_path / "ref", {"o": X})
    cand = ranked(tmp_path / "cand", [{"o": part}, {"o": X - part}])
    c = lockstep.compare(ref, cand)
    assert c.verdict == "match"
    assert c.ranks is not None and c.ranks.sides[0].merges[0].rule == "row"


def test_what_cannot_be_told_is_uncompared_and_incomplete(tmp_path):
    ref = single(tmp_path / "ref", {"h": X})
    other = X[::-1].copy()
    # "p": ranks differ and the reference has no record of that name to tell row from col
    cand = ranked(tmp_path / "cand", [{"h": X, "p": X}, {"h": X, "p": other}])
    c = lockstep.compare(ref, cand)
    assert c.verdict == "incomplete"
    assert c.ranks is not None
    (undecided,) = c.ranks.sides[0].undecided
    assert undecided.name == "p" and "annotate it" in undecided.why
    # a mapping file's [shard] rule decides it: partial sums
    mapping = tmp_path / "map.toml"
    mapping.write_text('[shard]\n"p" = "row"\n')
    c = lockstep.compare(ref, cand, mapping=load_mapping(mapping))
    assert c.verdict == "match"
    merge = c.ranks.sides[0].find(0, "p", 0) if c.ranks else None
    assert merge is not None and (merge.rule, merge.how) == ("row", "mapping")


def probed(path: Path, parts: tuple[np.ndarray, ...], name: str = "q",
           shard: tuple[str, int] = ("col", -1)) -> Path:
    """Each rank probes its part as ``name`` with a ``shard`` annotation (column-parallel)."""
    path.mkdir()
    (path / MANIFEST_FILE).write_text(json.dumps(manifest(len(parts))))
    for rank, part in enumerate(parts):
        with lockstep.record(rank_dir(path, rank), meta={"rank": rank, "world_size": 2}):
            lockstep.probe(name, part, shard=shard)
    return path


def test_an_annotation_that_does_not_fit_the_shapes_is_undecided(tmp_path):
    ref = single(tmp_path / "ref", {"q": X})
    # rank 1's shard is short of rows
    c = lockstep.compare(ref, probed(tmp_path / "cand", (X[:, :4], X[:3, 4:])))
    assert c.verdict == "incomplete"
    assert c.ranks is not None
    (undecided,) = c.ranks.sides[0].undecided
    assert undecided.how == "annotated" and "do not concatenate" in undecided.why
    # the same shards that do fit: concatenated on the annotated dim, and matched
    cand2 = probed(tmp_path / "cand2", (X[:, :4], X[:, 4:]))
    c = lockstep.compare(ref, cand2)
    assert c.verdict == "match"
    assert c.ranks is not None and c.ranks.sides[0].merges[0].bounds == (0, 4, 8)
    # both sides multi-rank: each merged by its annotations
    c = lockstep.compare(probed(tmp_path / "ref3", (X[:, :2], X[:, 2:])), cand2)
    assert c.verdict == "match" and c.ranks is not None
    assert [(s.side, s.merges[0].bounds) for s in c.ranks.sides] == \
        [("reference", (0, 2, 8)), ("candidate", (0, 4, 8))]


def _annotated_rows(path: Path, parts: tuple[np.ndarray, ...]) -> Path:
    """Each rank probes its part as ``o`` annotated as a row-parallel partial sum."""
    return probed(path, parts, "o", ("row", 0))


def test_a_row_annotation_on_the_reduced_output_is_one_copy(tmp_path):
    """A RowParallelLinear's output recorded after its all-reduce, annotated as the layer's
    partial sums ("row"): every rank holds the same values, which partial sums of different
    shards never do. Before: summed, DIVERGED at o ("OP o is 2 x the reference's while its
    input agrees"); now one copy, a match, and the merge says why. Real partial sums so
    annotated are still summed."""
    ref = single(tmp_path / "ref", {"o": X})
    _merged_as_one_copy(lockstep.compare(ref, _annotated_rows(tmp_path / "reduced",
                                                              (X, X.copy()))),
                        "o", "every rank holds the same values")
    part = np.random.default_rng(1).standard_normal(X.shape).astype(np.float32)
    c = lockstep.compare(ref, _annotated_rows(tmp_path / "partial", (part, X - part)))
    assert c.verdict == "match"
    assert c.ranks is not None and c.ranks.sides[0].merges[0].rule == "row"


def test_a_col_annotation_on_the_gathered_output_is_one_copy(tmp_path):
    """A ColumnParallelLinear's output recorded after its all-gather, annotated "col": every
    rank holds the whole tensor, the reference's shape. Before: concatenated to twice the
    width, incomparable, INCOMPLETE; now one copy, a match."""
    ref = single(tmp_path / "ref", {"q": X})
    _merged_as_one_copy(lockstep.compare(ref, probed(tmp_path / "gathered", (X, X.copy()))),
                        "q", "gathered already")


def _merged_as_one_copy(c, name: str, why: str) -> None:
    """The comparison matched, with the candidate's annotated ranks of ``name`` merged as
    one copy, and the merge says ``why``."""
    assert c.verdict == "match", (c.first_divergence, c.diagnosis, c.coverage)
    merge = c.ranks.sides[0].find(0, name, 0) if c.ranks else None
    assert merge is not None and (merge.rule, merge.how) == ("replicated", "annotated")
    assert why in merge.why


def test_check_reads_each_rank_of_a_multi_rank_recording(tp, tmp_path):
    """``lockstep check`` on a multi-rank recording checks each rank's dump: the TP engine's
    ranks are healthy; a NaN in rank 1's record is red there alone. Before, it refused the
    directory ('open one rank's dump')."""
    done = cli("check", str(tp["good"]), "--json", str(tmp_path / "good.json"))
    assert done.returncode == 0, done.stdout + done.stderr
    assert "rank0: " in done.stdout and "rank1: " in done.stdout
    body = json.loads((tmp_path / "good.json").read_text())
    assert [r["red_flags"] for r in body["ranks"]] == [0, 0]
    bad = X.copy()
    bad[2, 3] = np.nan
    cand = ranked(tmp_path / "nan", [{"h": X}, {"h": bad}])
    done = cli("check", str(cand), "--json", str(tmp_path / "nan.json"))
    assert done.returncode == 1, done.stdout + done.stderr
    body = json.loads((tmp_path / "nan.json").read_text())
    assert [r["red_flags"] for r in body["ranks"]] == [0, 1]


def test_recording_mistakes_are_usage_errors(tmp_path):
    from lockstep.capture.ranks import rank_path
    from lockstep.errors import UsageError

    plain = single(tmp_path / "plain", {"h": X})
    with pytest.raises(UsageError, match="holds a single-process dump"):
        rank_path(plain, 0, 2)
    with lockstep.record(tmp_path / "d"):
        with pytest.raises(UsageError, match="shard must be"):
            lockstep.probe("q", X, shard=("diagonal", 0))
    assert rank_path(tmp_path / "new", 0, 2) == tmp_path / "new" / "rank0"
    assert json.loads((tmp_path / "new" / MANIFEST_FILE).read_text())["world_size"] == 2


def test_weights_of_each_rank_are_its_shards_and_a_wrong_offset_is_named(tmp_path):
    """``check_loaded`` on one rank of the TP engine: each column- and row-parallel weight
    is the checkpoint's tensor's shard of this rank (every one was 'shape' before, a FAIL
    on a correct engine). Rank 1 loading rank 0's rows of q_proj holds shard 0 where its 12
    other sharded tensors hold shard 1: the offset is named, measured from the values."""
    from rich.console import Console

    from lockstep.checkpoint.weights_render import render_check

    model = save_tiny("llama", tmp_path / "llama")
    for rank in (0, 1):
        check = lockstep.check_loaded(tp_llama.load(model, rank, 2), model)
        assert check, check.problems
        layout = {p.name: p.transform for p in check.params}
        assert layout["model.layers.1.self_attn.q_proj.weight"] == f"shard {rank} of 2 (dim 0)"
        assert layout["model.layers.1.mlp.down_proj.weight"] == f"shard {rank} of 2 (dim 1)"
        assert layout["model.layers.1.input_layernorm.weight"] == ""  # replicated
    console = Console(width=200, record=True, color_system=None)
    console.print(*render_check(check))
    assert "(14 as shard 1 of 2: one tensor-parallel rank's)" in console.export_text()

    check = lockstep.check_loaded(tp_llama.load(model, 1, 2, "shard_offset"), model)
    assert [(p.name, p.status) for p in check.problems] == [
        (f"model.layers.{i}.self_attn.q_proj.weight", "different") for i in (0, 1)]
    assert check.problems[0].note == ("holds shard 0 of 2 (dim 0) where 12 of the model's "
                                      "sharded tensors hold shard 1: loaded at another rank's "
                                      "offset")
    assert {s.layer: s.verdict for s in check.layers}["model.layers.0"] == "differs"

    # rank 1 holding rank 0's shards everywhere agrees with itself: only its rank tells
    wrong = tp_llama.load(model, 0, 2)
    assert lockstep.check_loaded(wrong, model)
    check = lockstep.check_loaded(wrong, model, shard=(1, 2))
    assert len(check.problems) == 14 and {p.status for p in check.problems} == {"different"}
    assert check.problems[0].note == ("holds shard 0 of 2 (dim 0) where this is rank 1 of 2: "
                                      "loaded at another rank's offset")


def test_a_vocabulary_parallel_rank_holds_its_rows_of_the_padded_vocabulary(tmp_path):
    """vLLM's VocabParallelEmbedding pads the vocabulary (320 rows to 384 here) and gives
    each rank a slice of the padded rows: rank 1 of 2 holds rows 192-383, of which the last
    64 are zeros. That is 'shard 1 of 2 (dim 0, padded to 384)'; the same rows with
    something other than zeros in the padding are not."""
    import torch

    model = save_tiny("llama", tmp_path / "llama")
    net = tp_llama.load(model, 1, 2)
    full = net.model.embed_tokens.weight.detach()
    rows = torch.cat([full[192:], torch.zeros(64, full.shape[1])])
    net.model.embed_tokens.weight = torch.nn.Parameter(rows.clone())
    check = lockstep.check_loaded(net, model)
    assert check, check.problems
    embed = next(p for p in check.params if p.name == "model.embed_tokens.weight")
    assert embed.transform == "shard 1 of 2 (dim 0, padded to 384)"
    with torch.no_grad():
        net.model.embed_tokens.weight[128:] = 1.0
    (bad,) = lockstep.check_loaded(net, model).problems
    assert bad.name == "model.embed_tokens.weight" and bad.status == "different"
