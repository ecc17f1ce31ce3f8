"""Structural auto-alignment and automatic layout transforms (align.structure, align.layouts).

The candidates are real recordings of tiny transformers models (through lockstep's
transformers engine) rewritten the way other engines store the same tensors: names no table
knows, a fused QKV, attention heads as (H, T, D), q/k in the interleaved RoPE layout, and
16-element blocks of the QK-norm. A bug injected in layer 1 must not disturb the pairing.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
import torch

import lockstep
from lockstep.align.layouts import Layout, layout_candidates
from lockstep.align.pairing import align
from lockstep.align.transforms import apply_transform
from lockstep.engines.hf import HFEngine
from models import PROMPT, tiny

DECODE = 2
# transformers name within a layer -> a name no table knows (within trunk.N)
UNKNOWN = {
    "input_layernorm": "pre", "self_attn.q_proj": "sa.qp", "self_attn.k_proj": "sa.kp",
    "self_attn.v_proj": "sa.vp", "self_attn.rope:0": "sa.qr", "self_attn.rope:1": "sa.kr",
    "self_attn.q_norm": "sa.qn", "self_attn.k_norm": "sa.kn",
    "self_attn.o_proj:input.0": "sa.mix", "self_attn.o_proj": "sa.op",
    "post_attention_layernorm:input.0": "res1", "post_attention_layernorm": "pre2",
    "mlp.gate_proj": "ff.g", "mlp.up_proj": "ff.u", "mlp.act_fn": "ff.a",
    "mlp.down_proj:input.0": "ff.act", "mlp.down_proj": "ff.d", "": "out",
}
_LAYER = re.compile(r"model\.layers\.(\d+)(?:\.(.*?))?(:.*)?$")


def _record(model, path: Path, head_dim: int) -> None:
    model.save_pretrained(path.with_suffix(".model"))
    engine = HFEngine("hf:tiny", str(path.with_suffix(".model")))
    engine.load()
    with lockstep.record(path, meta={**engine.meta(), "head_dim": head_dim}) as rec:
        engine.generate(rec, PROMPT, DECODE, forced=[5, 6])


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Recordings of a tiny Llama: as is, and with layer 1's q_proj weight changed."""
    root = tmp_path_factory.mktemp("structure")
    model = tiny("llama")
    _record(model, root / "ref.lsd", 16)
    with torch.no_grad():
        model.model.layers[1].self_attn.q_proj.weight.mul_(-1.0)
    _record(model, root / "bug.lsd", 16)
    return root


Rewrite = Callable[[str, str, np.ndarray], list[tuple[str, np.ndarray]]]


def rewrite(src: Path, dst: Path, fn: Rewrite) -> Path:
    """A copy of a dump with each record renamed/reshaped by ``fn(layer_op, name, array)``,
    which returns the records to write instead (none to drop it)."""
    with lockstep.open_dump(src) as dump, lockstep.record(dst, meta=dict(dump.meta)) as rec:
        step = 0
        for r in dump.records:
            if r.step != step:
                rec.next_step()
                step = r.step
            for name, arr in fn(r.name, dump.read(r)):
                rec.capture(name, np.ascontiguousarray(arr))
    return dst


def unknown_name(name: str) -> str | None:
    m = _LAYER.fullmatch(name)
    if m is None:
        return {"model.embed_tokens": "emb", "model.norm": "final", "lm_head": "head",
                "input_ids": "input_ids"}.get(name)
    op = (m.group(2) or "") + (m.group(3) or "")
    return f"trunk.{m.group(1)}.{UNKNOWN[op]}" if op in UNKNOWN else None


def renamed(name: str, arr: np.ndarray) -> list[tuple[str, np.ndarray]]:
    new = unknown_name(name)
    return [(new, arr)] if new else []


def truth(dump, ref_name: str) -> str | None:
    """The candidate name a reference record should pair with; a record that holds the same
    data as an earlier one (a module returning its child's tensor) pairs as that one does."""
    first: dict[int, str] = {}
    for r in dump.records:
        first.setdefault(r.offset, r.name)
        if r.name == ref_name:
            return unknown_name(first[r.offset])
    return None


@pytest.mark.parametrize("source", ["ref.lsd", "bug.lsd"])
def test_names_no_table_knows_pair_by_structure(runs, tmp_path, source):
    cand = rewrite(runs / source, tmp_path / "cand.lsd", renamed)
    with lockstep.open_dump(runs / "ref.lsd") as r, lockstep.open_dump(cand) as c:
        result = align(r, c)
        layer_pairs = [p for p in result.pairs if p.ref.name.startswith("model.layers.")]
        firsts = {}
        for rec in r.records:
            firsts.setdefault(rec.offset, rec.seq)
        expected = sum(1 for rec in r.records if rec.name.startswith("model.layers.")
                       and truth(r, rec.name) and firsts[rec.offset] == rec.seq)
        assert result.aliased > 0
        assert not [x for x in result.ref_only if x.name.startswith("model.layers.")]
        wrong = [(p.ref.name, p.cand.name) for p in result.pairs
                 if truth(r, p.ref.name) != p.cand.name]
        assert not wrong
        assert len(layer_pairs) == expected
        assert all(p.how in ("structure", "name") for p in result.pairs)
        structural = [p for p in result.pairs if p.how == "structure"]
        assert all(p.confidence >= 0.9 and "values agree" in p.evidence
                   for p in structural if "layers.0." in p.ref.name)
    if source == "bug.lsd":  # the pairing holds after the divergence: the verdict is right
        found = lockstep.compare(runs / "ref.lsd", cand)
        assert found.verdict == "diverged"
        assert (found.first_divergence.ref_name, found.first_divergence.cand_name) == (
            "model.layers.1.self_attn.q_proj", "trunk.1.sa.qp")


def _heads(arr: np.ndarray, heads: int) -> np.ndarray:
    """(1, T, H*D) -> (1, H, T, D)."""
    b, t, hd = arr.shape
    return arr.reshape(b, t, heads, hd // heads).transpose(0, 2, 1, 3)


def _interleave(arr: np.ndarray, head_dim: int) -> np.ndarray:
    return apply_transform("rope_halfsplit", arr, {"head_dim": head_dim})


def other_layouts(name: str, arr: np.ndarray) -> list[tuple[str, np.ndarray]]:
    """Fused QKV, heads stored (H, T, D), q/k in the interleaved RoPE layout."""
    new = unknown_name(name)
    if new is None or new.endswith((".sa.kp", ".sa.vp")):
        return []  # fused into sa.qkv, written with sa.qp
    if new.endswith(".sa.qp"):
        return []
    if new.endswith(".sa.mix"):
        return [(new, _heads(arr, 4))]
    if new.endswith((".sa.qr", ".sa.kr")):
        return [(new, _interleave(arr, 16))]
    return [(new, arr)]


def test_fused_qkv_heads_first_and_interleaved_rope_are_paired_with_their_transform(
        runs, tmp_path):
    with lockstep.open_dump(runs / "ref.lsd") as r:
        parts: dict[tuple[int, str], dict[str, np.ndarray]] = {}
        for rec in r.records:
            m = _LAYER.fullmatch(rec.name)
            if m and m.group(2) in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"):
                parts.setdefault((rec.step, m.group(1)), {})[m.group(2)[-6]] = r.read(rec)

    def fn(name: str, arr: np.ndarray) -> list[tuple[str, np.ndarray]]:
        out = other_layouts(name, arr)
        m = _LAYER.fullmatch(name)
        if m and m.group(2) == "input_layernorm":  # the fused projection comes after it
            step = fn.step  # type: ignore[attr-defined]
            p = parts[(step, m.group(1))]
            out.append((f"trunk.{m.group(1)}.sa.qkv",
                        np.concatenate([p["q"], p["k"], p["v"]], axis=-1)))
        return out

    with lockstep.open_dump(runs / "ref.lsd") as r, \
            lockstep.record(tmp_path / "cand.lsd", meta=dict(r.meta)) as rec:
        step = 0
        for record in r.records:
            if record.step != step:
                rec.next_step()
                step = record.step
            fn.step = step  # type: ignore[attr-defined]
            for name, arr in fn(record.name, r.read(record)):
                rec.capture(name, np.ascontiguousarray(arr))
    with lockstep.open_dump(runs / "ref.lsd") as r, \
            lockstep.open_dump(tmp_path / "cand.lsd") as c:
        result = align(r, c)
        got = {(p.ref.step, p.ref.name): p for p in result.pairs}
        for layer in (0, 1):
            base = f"model.layers.{layer}.self_attn"
            for i, proj in enumerate(("q_proj", "k_proj", "v_proj")):
                p = got[(1, f"{base}.{proj}")]
                assert p.cand.name == f"trunk.{layer}.sa.qkv"
                assert p.cand_transform == f"squeeze|slice(-1, {(0, 64, 96)[i]}, " \
                                          f"{(64, 96, 128)[i]})"
            mix = got[(0, f"{base}.o_proj:input.0")]
            assert mix.cand.name == f"trunk.{layer}.sa.mix"
            assert mix.cand_transform == "squeeze|permute(1, 0, 2)|reshape(7, 64)"
            rope = got[(0, f"{base}.rope:0")]
            assert rope.cand.name == f"trunk.{layer}.sa.qr"
            assert rope.cand_transform.startswith("rope_interleaved")
            assert "layout convention" in rope.evidence
    compared = lockstep.compare(runs / "ref.lsd", tmp_path / "cand.lsd")
    assert compared.verdict == "match", compared.first_divergence
    assert any(p.transform and "slice" in p.transform for p in compared.results)


def test_blocks_of_the_qk_norm_pair_with_slices_of_the_reference(tmp_path):
    """A Qwen3 candidate that, in decode steps, records its QK-norm only as 16-element
    blocks (the seed 001 VM): each block pairs with its slice of the reference."""
    from transformers import Qwen3Config, Qwen3ForCausalLM

    torch.manual_seed(0)
    model = Qwen3ForCausalLM(Qwen3Config(
        vocab_size=160, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=1, head_dim=64,
        max_position_embeddings=128)).eval()
    _record(model, tmp_path / "ref.lsd", 64)

    def fn(name: str, arr: np.ndarray) -> list[tuple[str, np.ndarray]]:
        new = unknown_name(name)
        if new is None:
            return []
        if new.endswith((".sa.qn", ".sa.kn")) and arr.shape[1] == 1:  # decode: blocks
            flat = arr.reshape(-1)
            layer = new.split(".")[1]
            return [(f"vm.layer_{layer}.{new[-2:]}_norm.blk{b}", flat[16 * b:16 * b + 16])
                    for b in range(flat.size // 16)]
        return [(new, arr)]

    cand = rewrite(tmp_path / "ref.lsd", tmp_path / "cand.lsd", fn)
    with lockstep.open_dump(tmp_path / "ref.lsd") as r, lockstep.open_dump(cand) as c:
        result = align(r, c)
        blocks = [p for p in result.pairs if ".blk" in p.cand.name]
        assert len(blocks) == DECODE * 2 * (128 // 16 + 64 // 16)
        for p in blocks:
            b = int(p.cand.name.rsplit("blk", 1)[1])
            which = "q_norm" if ".qn_norm" in p.cand.name else "k_norm"
            layer = p.cand.name.split(".")[1].split("_")[1]
            assert p.ref.name == f"model.layers.{layer}.self_attn.{which}"
            assert p.ref_transform == f"block(16, {b})"
        assert not [x for x in result.ref_only if "norm" in x.name and x.step > 0]
    assert lockstep.compare(tmp_path / "ref.lsd", cand).verdict == "match"


def test_layout_candidates():
    assert layout_candidates((1, 7, 64), (7, 64))[0].cand_transform is None
    first = layout_candidates((1, 7, 64), (4, 7, 16))[0]
    assert first.cand_transform == "squeeze|permute(1, 0, 2)|reshape(7, 64)"
    assert layout_candidates((7, 64), (7, 4, 16))[0].cand_transform == "reshape(7, 64)"
    assert layout_candidates((7, 64), (7, 65)) == []
    # a vocabulary padded to a multiple of 64 (320 to 384): the reference's columns, never
    # plausible on shapes alone; with the last position of a prefill, the block too
    assert layout_candidates((7, 320), (7, 384)) == [
        Layout(cand_transform="slice(-1, 0, 320)", plausible=False)]
    assert Layout(ref_transform="block(320, 4)", cand_transform="slice(-1, 0, 320)",
                  plausible=False) in layout_candidates((1, 5, 320), (1, 384))
    assert layout_candidates((7, 64), (7, 128)) == []  # twice as wide: not a padding
    blocks = layout_candidates((1, 1, 64), (16,))
    assert [b.ref_transform for b in blocks] == [f"block(16, {i})" for i in range(4)]


@pytest.mark.parametrize("bug", [None, "layer_not_loaded"])
def test_llama_reference_names_pair_through_tables_and_by_structure_alone(tmp_path, bug):
    """The zoo records with the Llama reference code's names: paired with transformers by
    the name tables, and by structural auto-alignment alone with the tables switched off,
    with a bug in layer 1 and without."""
    from lockstep.zoo.engine import ZooEngine
    from lockstep.zoo.score import FORCED, tiny_model
    from lockstep.zoo.score import PROMPT as ZOO_PROMPT

    model = tiny_model("llama", tmp_path / "llama")
    hf = HFEngine(f"hf:{model}", str(model))
    hf.load()
    zoo = ZooEngine(f"zoo:{model}", str(model), bug=bug)
    zoo.load()
    for engine, name in ((hf, "ref.lsd"), (zoo, "cand.lsd")):
        with lockstep.record(tmp_path / name, meta=engine.meta()) as rec:
            engine.generate(rec, ZOO_PROMPT, len(FORCED), forced=FORCED)
    with lockstep.open_dump(tmp_path / "ref.lsd") as r, \
            lockstep.open_dump(tmp_path / "cand.lsd") as c:
        tables = align(r, c)
        structural = align(r, c, use_tables=False)
    seen: set[int] = set()
    layer_records = []  # every layer tensor the zoo recorded (not the repeats of one)
    for x in c.records:
        if x.name.startswith("layers.") and x.offset not in seen:
            layer_records.append(x)
        seen.add(x.offset)
    # a repeat paired by table (the dense feed_forward's output, w2's tensor again, is the
    # MoE block's mlp_out rule's too) is set aside by the structural pass, which drops repeats
    kept = {x.seq for x in layer_records}
    by_table = {(p.ref.step, p.ref.name): p.cand.name for p in tables.pairs
                if p.cand.name.startswith("layers.") and p.cand.seq in kept}
    assert tables.tables == ("transformers-llama", "llama-reference")
    assert {p.cand.seq for p in tables.pairs} >= kept
    assert len(by_table) >= len(layer_records)
    by_structure = {(p.ref.step, p.ref.name): p.cand.name for p in structural.pairs}
    wrong = {k: (v, by_structure.get(k)) for k, v in by_table.items()
             if by_structure.get(k) != v}
    assert not wrong
