"""Mapping files: parsing, mistakes named by file:line:col, lookup, ignore, tolerances, the
file ``lockstep align --write`` writes; the ``align`` command and ``--mapping`` on real dumps."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch

import lockstep
from lockstep.align.mapping import MappingHit, load_mapping
from lockstep.align.mapping_writer import mapping_text
from lockstep.align.pairing import Alignment, Pair
from lockstep.cli.main import main
from lockstep.compare import Tolerances
from lockstep.errors import UsageError
from lockstep.store.reader import Record
from models import PROMPT, tiny

EXAMPLE = r"""
ignore = ["*.dropout", "trunk.*.scratch"]

[tolerances]
"model.layers.*.mlp.*" = 1e-3

[[rule]]   # the fused QKV: three rules, one per reference record
cand = 'trunk\.(\d+)\.sa\.qkv'
ref = "model.layers.{1}.self_attn.q_proj"
transform = "slice(-1, 0, 64)"
tolerance = 2e-3

[[rule]]
cand = 'trunk\.(\d+)\.sa\.qkv'
ref = "model.layers.{1}.self_attn.k_proj"
transform = "slice(-1, 64, 96)"

[[rule]]
cand = 'trunk\.(\d+)\.sa\.qkv'
ref = "model.layers.{1}.self_attn.v_proj"
transform = "slice(-1, 96, 128)"

[[rule]]   # (heads, tokens, head_dim) on the candidate side
cand = 'trunk\.(?P<layer>\d+)\.sa\.q_rot'
ref = "model.layers.{layer}.self_attn.rope:0"
transform = "permute(1, 0, 2)|cast(float32)"
ref_transform = "squeeze"

[[rule]]   # 16-element blocks of the reference's q norm
cand = 'trunk\.(\d+)\.sa\.qn\.b(\d+)'
ref = "model.layers.{1}.self_attn.q_norm"
ref_transform = "block(16, {2})"
"""


@pytest.fixture
def example(tmp_path):
    path = tmp_path / "map.toml"
    path.write_text(EXAMPLE)
    return load_mapping(path)


def test_lookup_fills_groups_and_gives_every_rule_that_matches(example):
    assert example.lookup("trunk.3.sa.qkv") == [
        MappingHit("model.layers.3.self_attn.q_proj", "slice(-1, 0, 64)", None, 0),
        MappingHit("model.layers.3.self_attn.k_proj", "slice(-1, 64, 96)", None, 1),
        MappingHit("model.layers.3.self_attn.v_proj", "slice(-1, 96, 128)", None, 2),
    ]
    assert example.lookup("trunk.12.sa.q_rot") == [MappingHit(
        "model.layers.12.self_attn.rope:0", "permute(1, 0, 2)|cast(float32)", "squeeze", 3)]
    assert example.lookup("trunk.0.sa.qn.b7") == [
        MappingHit("model.layers.0.self_attn.q_norm", None, "block(16, 7)", 4)]
    assert example.lookup("trunk.3.sa.qkv.extra") == []  # regexes match the whole name
    assert example.lookup("xtrunk.3.sa.qkv") == []
    assert example.where(4).endswith("map.toml:29")


def test_ignore_and_tolerances(example, tmp_path):
    assert example.ignored("model.layers.0.dropout", "ref")
    assert example.ignored("trunk.4.scratch", "cand")
    assert not example.ignored("trunk.4.sa.qkv", "cand")
    with pytest.raises(ValueError):
        example.ignored("x", "both")
    assert example.tolerances() == [("model.layers.*.self_attn.q_proj", 2e-3),
                                    ("model.layers.*.mlp.*", 1e-3)]
    tol = Tolerances.parse(None, ["model.layers.1.*=0.5"]).with_patterns(example.tolerances())
    assert tol.for_pair("model.layers.1.self_attn.q_proj", "float32", "float32", {}, {}).match \
        == 0.5  # the command line's --tol first
    assert tol.for_pair("model.layers.2.self_attn.q_proj", "float32", "float32", {}, {}).match \
        == 2e-3
    assert tol.for_pair("model.layers.2.mlp.up_proj", "float32", "float32", {}, {}).match \
        == 1e-3
    sides = tmp_path / "sides.toml"
    sides.write_text('[ignore]\nref = ["model.rotary_emb:*"]\ncand = ["[*]weird"]\n')
    m = load_mapping(sides)
    assert m.ignored("model.rotary_emb:0", "ref") and not m.ignored("model.rotary_emb:0", "cand")
    assert m.ignored("*weird", "cand") and not m.ignored("xweird", "cand")
    assert (m.rules, m.tolerances()) == ((), [])


RULE = "[[rule]]\ncand = 'trunk\\.(\\d+)\\.qp'\nref = \"model.layers.{1}.q_proj\"\n"


@pytest.mark.parametrize("text, message", [
    ("rules = 1\n", "1:9: unknown key 'rules'; a mapping file has [[rule]] tables, ignore, "
                    "[tolerances] and [shard]"),
    ('[shard]\n"*.o_proj" = "diagonal"\n', "2:14: the shard rule for '*.o_proj' must be "
                                           "\"col:DIM\", \"row\" or \"replicated\", got "
                                           "'diagonal'"),
    ("[[rule]]\ncand = 'a'\nref = 'b'\nrename = 1\n",
     "4:10: unknown key 'rename' in a [[rule]]; a rule has cand, ref, transform, "
     "ref_transform, tolerance"),
    (RULE + "\n[[rule]]\ncand = 'x'\n", "5:1: this [[rule]] has no ref = \"...\"; every rule "
                                        "needs cand (a regex) and ref (a template)"),
    ("[[rule]]\ncand = 'trunk\\.(\\d+'\nref = 'b'\n",
     "2:16: cand regex 'trunk\\\\.(\\\\d+' is not valid: missing ), unterminated subpattern; "
     "fix the regex (in single quotes backslashes stay as typed)"),
    (RULE.replace("{1}", "{2}"), "3:7: ref 'model.layers.{2}.q_proj': {2} is not a group of "
     "the cand regex, which has 1 group; write {1} for the first group ({0} is the whole "
     "name)"),
    (RULE.replace("{1}", "{1"), "3:7: ref 'model.layers.{1.q_proj': unbalanced braces; "
                                "write a literal brace as {{ or }}"),
    (RULE + "transform = 'reshape(-1, n_heads, head_dim)|frob'\n",
     "4:13: transform 'reshape(-1, n_heads, head_dim)|frob': 'frob' is not one of squeeze, "
     "flatten, reshape, permute, transpose, slice, block, cast, rope_interleaved, "
     "rope_halfsplit"),
    (RULE + "transform = 'slice(-1, 0)'\n",
     "4:13: transform 'slice(-1, 0)': slice takes 3 arguments, got 2"),
    (RULE + "ref_transform = 'slice(-1, 0, n_layers*head_dim)'\n",
     "4:17: ref_transform 'slice(-1, 0, n_layers*head_dim)': slice size 'n_layers*head_dim' is "
     "not an integer or an expression of integers and head_dim, n_heads, n_kv_heads, n_ff "
     "with + - * and parentheses"),
    (RULE + "transform = 'cast(float33)'\n",
     "4:13: transform 'cast(float33)': cast: 'float33' is not a numpy dtype (e.g. float32)"),
    (RULE + "tolerance = -1\n", "4:13: tolerance must be a number >= 0 (a relative L2 error "
                                "such as 1e-3), got -1"),
    ("[tolerances]\n\"a.*\" = \"big\"\n", "2:9: the tolerance for 'a.*' must be a number >= 0 "
                                          "(a relative L2 error such as 1e-3), got 'big'"),
    ("ignore = 'x'\n", "1:10: ignore must be a list of glob strings, e.g. [\"*.dropout\"], "
                       "got 'x'"),
    ("[ignore]\nreference = []\n", "2:13: unknown key 'reference' in [ignore]; it has ref "
                                   "and cand"),
    ("[[rule]\ncand = 'a'\n", "1:7: not valid TOML: Expected ']]' at the end of an array "
                              "declaration; see docs/mapping.md for the format"),
])
def test_mistakes_name_the_file_line_and_column(tmp_path, text, message):
    path = tmp_path / "bad.toml"
    path.write_text(text)
    with pytest.raises(UsageError) as info:
        load_mapping(path)
    assert str(info.value) == f"{path}:{message}"


def test_the_worked_example_of_the_docs(tmp_path):
    doc = (Path(__file__).parent.parent / "docs" / "mapping.md").read_text()
    path = tmp_path / "trunk.toml"
    path.write_text(re.search(r"```toml\n(# trunk\.toml.*?)```", doc, re.S).group(1))
    mapping = load_mapping(path)
    assert [(h.ref_name, h.cand_transform) for h in mapping.lookup("trunk.5.sa.qkv")] == [
        ("model.layers.5.self_attn.q_proj", "slice(-1, 0, 2048)"),
        ("model.layers.5.self_attn.k_proj", "slice(-1, 2048, 3072)"),
        ("model.layers.5.self_attn.v_proj", "slice(-1, 3072, 4096)")]
    assert mapping.lookup("trunk.5.sa.qn.b7") == [
        MappingHit("model.layers.5.self_attn.q_norm", None, "block(16, 7)", 4)]
    assert mapping.lookup("trunk.5.sa.heads") == [MappingHit(
        "model.layers.5.self_attn.o_proj:input.0", "permute(1, 0, 2)",
        "reshape(-1, n_heads, head_dim)", 5)]
    assert mapping.lookup("trunk.5.sa.out")[0].ref_name == "model.layers.5.self_attn.o_proj"
    assert mapping.ignored("trunk.5.scratch", "cand")
    assert mapping.tolerances() == [("model.layers.*.mlp.down_proj:input.0", 1e-2),
                                    ("model.layers.*.mlp.*", 5e-3)]
    path.write_text(path.read_text().replace('"model.layers.{1}.self_attn.k_proj"',
                                             '"model.layers.{2}.self_attn.k_proj"'))
    with pytest.raises(UsageError) as info:
        load_mapping(path)
    assert f"lockstep: error: trunk.toml{str(info.value)[len(str(path)):]}" in doc


def test_a_missing_file_is_a_usage_error(tmp_path):
    with pytest.raises(UsageError, match="cannot read the mapping file .*nope.toml"):
        load_mapping(tmp_path / "nope.toml")


def _rec(name: str, seq: int, step: int = 0) -> Record:
    return Record(name=name, step=step, seq=seq, dtype="float32", shape=(1, 7, 64))


def _alignment() -> Alignment:
    """Two steps of three layers: a fused QKV, 1-based layer numbers, blocks, unpaired."""
    pairs, ref_only, cand_only = [], [], []
    for step in (0, 1):
        seq = iter(range(1000 * step, 1000 * (step + 1)))
        pairs.append(Pair(_rec("input_ids", next(seq), step), _rec("input_ids", next(seq), step),
                          "name"))
        for layer in range(3):
            qkv = _rec(f"trunk.{layer}.sa.qkv", next(seq), step)
            for i, proj in enumerate("qkv"):
                ref = _rec(f"model.layers.{layer}.self_attn.{proj}_proj", next(seq), step)
                pairs.append(Pair(ref, qkv, "structure", None, None,
                                  f"slice(-1, {64 * i}, {64 * (i + 1)})"))
            pairs.append(Pair(_rec(f"model.layers.{layer}.mlp", next(seq), step),
                              _rec(f"blk{layer + 1}/ffn", next(seq), step), "structure"))
            for b in (0, 3):
                pairs.append(Pair(_rec(f"model.layers.{layer}.self_attn.q_norm", next(seq), step),
                                  _rec(f"trunk.{layer}.sa.qn.b{b}", next(seq), step), "table",
                                  f"layers.{layer}.q_norm", f"block(16, {b})"))
            ref_only.append(_rec(f"model.layers.{layer}.self_attn:0", next(seq), step))
        cand_only.append(_rec("weird[name]", next(seq), step))
    return Alignment(tuple(pairs), tuple(ref_only), tuple(cand_only))


def test_mapping_text_generalises_layers_and_loads_back(tmp_path):
    alignment = _alignment()
    text = mapping_text(alignment, reference="ref.lsd", candidate="cand.lsd")
    assert "cand = 'trunk\\.(\\d+)\\.sa\\.qkv'\nref = 'model.layers.{1}.self_attn.k_proj'\n" \
           "transform = 'slice(-1, 64, 128)'\n" in text
    assert "cand = 'trunk\\.(\\d+)\\.sa\\.qn\\.b(\\d+)'\nref = 'model.layers.{1}.self_attn." \
           "q_norm'\nref_transform = 'block(16, {2})'\n" in text
    # the candidate counts layers from 1: no number of it gives the reference's, one rule each
    assert "cand = 'blk1/ffn'\nref = 'model.layers.0.mlp'\n" in text
    assert "  # 'model.layers.*.self_attn:0',\n" in text and "  # 'weird[[]name[]]',\n" in text
    path = tmp_path / "written.toml"
    path.write_text(text)
    mapping = load_mapping(path)
    assert len(mapping.rules) == 3 + 3 + 1
    for p in alignment.pairs:
        if p.ref.name != p.cand.name:
            hits = {(h.ref_name, h.cand_transform, h.ref_transform)
                    for h in mapping.lookup(p.cand.name)}
            assert (p.ref.name, p.cand_transform, p.ref_transform) in hits
    assert not mapping.ignored("model.layers.0.self_attn:0", "ref")  # commented out


# -- the command and --mapping on real dumps ---------------------------------------------

def _record(model, path, rename=lambda n: n, meta=None):
    """One forward of a tiny model; every record renamed (None: left out)."""
    tmp = path.with_suffix(".orig")
    with lockstep.record(tmp, meta=meta) as rec, torch.no_grad():
        rec.watch(model, inputs=["*.o_proj", "*.post_attention_layernorm", "*.down_proj"])
        lockstep.probe("input_ids", torch.tensor([PROMPT]))
        model(torch.tensor([PROMPT]))
    with lockstep.open_dump(tmp) as src, lockstep.record(path, meta=dict(src.meta)):
        for r in src:
            name = rename(r.name)
            if name is not None:
                lockstep.probe(name, np.array(src.read(r)))


def _trunk(name: str) -> str | None:
    """A made-up engine's names: trunk.N.sa.qp for model.layers.N.self_attn.q_proj, ..."""
    if "rotary" in name or name.endswith(":0"):
        return None
    return name.replace("model.layers.", "trunk.").replace("self_attn.", "sa.") \
        .replace("q_proj", "qp").replace("model.", "")


@pytest.fixture(scope="module")
def dumps(tmp_path_factory):
    root = tmp_path_factory.mktemp("dumps")
    model = tiny("llama")
    _record(model, root / "ref.lsd")
    _record(model, root / "same.lsd")
    _record(model, root / "trunk.lsd", _trunk)
    return root


def test_align_pairs_identical_names(dumps, capsys, monkeypatch, tmp_path):
    monkeypatch.setenv("COLUMNS", "200")
    out_json = tmp_path / "a.json"
    assert main(["align", str(dumps / "ref.lsd"), str(dumps / "same.lsd"), "--json",
                 str(out_json)]) == 0
    out = capsys.readouterr().out
    name = r"model\.layers\.1\.mlp\.down_proj"
    assert re.search(rf"│ {name} +│ {name} +│ name +│", out)
    report = json.loads(out_json.read_text())
    assert report["ref_only"] == report["cand_only"] == []
    assert {p["how"] for p in report["pairs"]} == {"name"}
    with lockstep.open_dump(dumps / "ref.lsd") as ref:
        assert len(report["pairs"]) == len(ref.records)


def test_align_writes_a_mapping_that_compare_uses(dumps, capsys, monkeypatch, tmp_path):
    monkeypatch.setenv("COLUMNS", "200")
    written = tmp_path / "trunk.toml"
    ref, cand = str(dumps / "ref.lsd"), str(dumps / "trunk.lsd")
    assert main(["align", ref, cand, "--write", str(written), "--step", "0"]) == 0
    captured = capsys.readouterr()
    assert f"wrote the mapping file {written}" in captured.err
    assert "reference only, step 0" in captured.out
    mapping = load_mapping(written)
    assert mapping.lookup("trunk.1.sa.qp") == [
        MappingHit("model.layers.1.self_attn.q_proj", None, None, mapping.lookup(
            "trunk.1.sa.qp")[0].rule)]
    # with the file (and a tolerance for one reference name), compare pairs by mapping
    written.write_text(written.read_text() + '\n[tolerances]\n"model.layers.*.mlp.up_proj" '
                                             '= 0.25\n')
    report = tmp_path / "report.json"
    assert main(["compare", ref, cand, "--mapping", str(written), "--json", str(report)]) == 0
    pairs = json.loads(report.read_text())["pairs"]
    by_cand = {p["candidate"]: p for p in pairs}
    assert by_cand["trunk.1.sa.qp"]["paired_by"] == "mapping"
    assert by_cand["trunk.1.sa.qp"]["error"] == 0.0
    assert by_cand["trunk.0.mlp.up_proj"]["tolerance"] == 0.25


def test_align_mistakes_exit_2_with_one_line(dumps, capsys, tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("[[rule]]\ncand = 'a'\n")
    ref = str(dumps / "ref.lsd")
    assert main(["align", ref, ref, "--mapping", str(bad)]) == 2
    assert capsys.readouterr().err == (f"lockstep: error: {bad}:1:1: this [[rule]] has no ref "
                                       "= \"...\"; every rule needs cand (a regex) and ref "
                                       "(a template)\n")
    assert main(["align", ref, ref, "--step", "4"]) == 2
    assert capsys.readouterr().err == "lockstep: error: --step 4: the two dumps have steps 0\n"
    assert main(["compare", ref, ref, "--mapping", str(tmp_path / "none.toml")]) == 2
