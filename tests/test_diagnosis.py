"""The diagnosis beside the first divergence: every kind from dumps of a small numpy
transformer written with lockstep's own recorder (one bug switched on in the candidate),
exact expectations, negative cases, and two real tiny transformers models."""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from rich.console import Console

import lockstep
from lockstep.compare.case import Case
from lockstep.compare.diagnosis import KINDS, RULES, Diagnosis, diagnose, rule
from lockstep.compare.diagnosis import registry as rules
from lockstep.compare.diagnosis import run as diagnosis_module
from lockstep.report import ComparisonReport, report_dict
from models import PROMPT as HF_PROMPT
from models import greedy, tiny, variant

PROMPT = [3, 17, 42, 7, 99, 5, 64]
T, HIDDEN, H, KVH, D, FF, VOCAB = len(PROMPT), 64, 4, 2, 32, 96, 160
META = {"engine": "numpy", "head_dim": D, "n_heads": H, "n_kv_heads": KVH}
BASE = 500000.0

#: the candidate's names when it records like Meta's reference code (the zoo)
_META_NAMES = {"model.embed_tokens": "tok_embeddings", "input_layernorm": "attention_norm",
               "self_attn.q_proj": "attention.wq", "self_attn.k_proj": "attention.wk",
               "self_attn.v_proj": "attention.wv", "self_attn.q_norm": "attention.q_norm",
               "self_attn.k_norm": "attention.k_norm", "self_attn.rope:0": "attention.rope:0",
               "self_attn.rope:1": "attention.rope:1",
               "self_attn.o_proj:input.0": "attention.wo:input.0",
               "self_attn.o_proj": "attention.wo",
               "post_attention_layernorm:input.0": "ffn_norm:input.0",
               "post_attention_layernorm": "ffn_norm", "mlp.gate_proj": "feed_forward.w1",
               "mlp.up_proj": "feed_forward.w3", "mlp.down_proj:input.0": "feed_forward.w2:input.0",
               "mlp.down_proj": "feed_forward.w2", "model.norm": "norm", "lm_head": "output"}


class Mini:
    """A 2-layer Qwen3-shaped transformer in numpy (QK-norm, GQA, half-split RoPE)."""

    def __init__(self, seed: int = 0) -> None:
        rng = np.random.default_rng(seed)

        def w(*shape: int) -> np.ndarray:
            return (rng.standard_normal(shape) / np.sqrt(shape[-1])).astype(np.float32)

        def norm(n: int) -> np.ndarray:
            return (1 + 0.2 * rng.standard_normal(n)).astype(np.float32)

        self.embed = rng.standard_normal((VOCAB, HIDDEN)).astype(np.float32)
        self.layers = [dict(attn_norm=norm(HIDDEN), q=w(H * D, HIDDEN), k=w(KVH * D, HIDDEN),
                            v=w(KVH * D, HIDDEN), q_norm=norm(D), k_norm=norm(D),
                            o=w(HIDDEN, H * D), mlp_norm=norm(HIDDEN), gate=w(FF, HIDDEN),
                            up=w(FF, HIDDEN), down=w(HIDDEN, FF)) for _ in range(2)]
        self.final_norm = norm(HIDDEN)
        self.lm_head = w(VOCAB, HIDDEN)


def _rms(x: np.ndarray, block: int | None = None) -> np.ndarray:
    if block is None:
        return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + 1e-6)
    xb = x.reshape(*x.shape[:-1], -1, block)
    return (xb / np.sqrt(np.mean(xb * xb, axis=-1, keepdims=True) + 1e-6)).reshape(x.shape)


def _tables(pos: np.ndarray, base: float) -> tuple[np.ndarray, np.ndarray]:
    freqs = np.outer(pos, base ** (-np.arange(0, D, 2) / D))
    emb = np.concatenate([freqs, freqs], axis=-1)
    return np.cos(emb), np.sin(emb)


def _rope(x: np.ndarray, cos: np.ndarray, sin: np.ndarray, interleaved: bool) -> np.ndarray:
    c, s = cos[:, None, :D // 2], sin[:, None, :D // 2]
    a, b = (x[..., 0::2], x[..., 1::2]) if interleaved else (x[..., :D // 2], x[..., D // 2:])
    ya, yb = a * c - b * s, b * c + a * s
    if interleaved:
        return np.stack([ya, yb], axis=-1).reshape(x.shape)
    return np.concatenate([ya, yb], axis=-1)


def _attention(q: np.ndarray, k: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Causal GQA attention of the last len(q) positions over every cached key: (t, H, D)."""
    t, s = len(q), len(k)
    out = np.empty_like(q)
    for h in range(H):
        kv = h // (H // KVH)
        scores = q[:, h] @ k[:, kv].T / np.sqrt(D)
        scores = np.where(np.arange(s)[None, :] <= np.arange(s - t, s)[:, None], scores, -np.inf)
        p = np.exp(scores - scores.max(axis=1, keepdims=True))
        out[:, h] = (p / p.sum(axis=1, keepdims=True)) @ v[:, kv]
    return out


def run(path: Path, model: Mini, *, bug: str | None = None, decode: int = 2,
        forced: list[int] | None = None, names: str = "hf", tables: bool = True,
        dtype: Any = np.float32, blocks: int | None = None, data: bool = True) -> list[int]:
    """Record prefill and ``decode`` greedy steps of ``model`` with one ``bug`` switched on."""
    m = model
    if bug == "weight":
        m = Mini()
        m.layers[1]["gate"][5, 3] += 1.0
    elif bug == "nan":
        m = Mini()
        m.layers[1]["down"][5] = np.nan
    elif bug == "zeros":
        m = Mini()
        m.layers[0]["v"][:] = 0.0
    elif bug == "scaled":
        m = Mini()
        m.layers[1]["down"] *= 1.5
    elif bug == "embed_scale":
        m = Mini()
        m.embed *= 3.0  # not √HIDDEN (8), which is the `scale` diagnosis
    base = 10000.0 if bug == "rope_base" else BASE
    chosen: list[int] = []
    stale: dict[int, np.ndarray] = {}
    cache: list[dict[str, list[np.ndarray]]] = [{"k": [], "v": []} for _ in m.layers]
    with lockstep.record(path, meta=META, data=data) as rec:

        def cap(name: str, a: np.ndarray, layer: int | None = None) -> None:
            full = f"model.layers.{layer}.{name}" if layer is not None else name
            if names == "meta":
                full = (f"layers.{layer}.{_META_NAMES.get(name, name)}" if layer is not None
                        else _META_NAMES.get(name, name))
            rec.capture(full, np.ascontiguousarray(a[None]).astype(dtype))

        ids, pos = np.array(PROMPT), np.arange(T)
        for step in range(decode + 1):
            if step:
                rec.next_step()
                fed = forced[step - 1] if forced else chosen[-1]
                ids = np.array([PROMPT[-1] if bug == "stale_token" else fed])
                pos = np.array([T + step - 1 + (bug == "position")])
            fed_ids = np.arange(T) if bug == "swapped" and step == 0 else ids
            rec.capture("input_ids", fed_ids[None].astype(np.int64))
            x = m.embed[fed_ids]
            cap("model.embed_tokens", x)
            cos, sin = _tables(pos, base)
            if tables and names == "hf":
                cap("model.rotary_emb:0", cos)
                cap("model.rotary_emb:1", sin)
            t = len(ids)
            for i, L in enumerate(m.layers):
                h = _rms(x) * L["attn_norm"]
                cap("input_layernorm", h, i)
                q, k, v = h @ L["q"].T, h @ L["k"].T, h @ L["v"].T
                cap("self_attn.q_proj", q, i)
                cap("self_attn.k_proj", k, i)
                cap("self_attn.v_proj", v, i)
                block = 16 if bug == "blocked" else None
                qn = _rms(q.reshape(t, H, D), block) * L["q_norm"]
                kn = _rms(k.reshape(t, KVH, D), block) * L["k_norm"]
                if bug == "blocked" and names == "meta":
                    for b, part in enumerate(qn.reshape(-1, 16)[:blocks]):
                        cap(f"attention.q_norm.block{b}", part[None], i)
                else:
                    cap("self_attn.q_norm", qn, i)
                cap("self_attn.k_norm", kn, i)
                qr = _rope(qn, cos, sin, bug == "interleaved")
                kr = _rope(kn, cos, sin, bug == "interleaved")
                cap("self_attn.rope:0", qr.transpose(1, 0, 2) if names == "hf" else qr, i)
                cap("self_attn.rope:1", kr.transpose(1, 0, 2) if names == "hf" else kr, i)
                if bug == "kv_cache" and step:  # decode attends before writing its own K/V
                    heads = _attention(qr, np.concatenate(cache[i]["k"]),
                                       np.concatenate(cache[i]["v"]))
                cache[i]["k"].append(kr)
                cache[i]["v"].append(v.reshape(t, KVH, D))
                if bug != "kv_cache" or not step:
                    heads = _attention(qr, np.concatenate(cache[i]["k"]),
                                       np.concatenate(cache[i]["v"]))
                if bug == "heads":  # (H, t, D) read straight as (t, H * D)
                    o = np.ascontiguousarray(heads.transpose(1, 0, 2)).reshape(t, H * D)
                else:
                    o = heads.reshape(t, H * D)
                cap("self_attn.o_proj:input.0", o, i)
                a = o @ L["o"].T
                cap("self_attn.o_proj", a, i)
                x = x + a
                cap("post_attention_layernorm:input.0", x, i)
                h2 = _rms(x) * L["mlp_norm"]
                cap("post_attention_layernorm", h2, i)
                g, u = h2 @ L["gate"].T, h2 @ L["up"].T
                cap("mlp.gate_proj", g, i)
                cap("mlp.up_proj", u, i)
                act = g / (1 + np.exp(-g)) * u
                cap("mlp.down_proj:input.0", act, i)
                d = act @ L["down"].T
                if bug == "stale" and i == 1 and step >= 2:
                    d = stale[i]
                stale[i] = d
                cap("mlp.down_proj", d, i)
                x = x + d
                rec.capture(f"layers.{i}" if names == "meta" else f"model.layers.{i}",
                            x[None].astype(dtype))
            n = _rms(x) * m.final_norm
            cap("model.norm", n)
            logits = n @ m.lm_head.T
            if bug == "logits_tail":
                logits = logits + np.linspace(0, 40, VOCAB)
            cap("lm_head", logits)
            chosen.append(int(np.argmax(logits[-1])))
    return chosen


@pytest.fixture(scope="module")
def mini() -> Mini:
    return Mini()


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory, mini: Mini) -> tuple[Path, list[int]]:
    path = tmp_path_factory.mktemp("ref") / "ref"
    return path, run(path, mini)


def diagnosed(tmp_path: Path, mini: Mini, reference: tuple[Path, list[int]],
              **options: Any) -> tuple[lockstep.Comparison, Diagnosis]:
    ref, tokens = reference
    run(tmp_path / "cand", mini, forced=tokens[:-1], **options)
    result = lockstep.compare(ref, tmp_path / "cand")
    assert result.verdict == "diverged"
    assert result.diagnosis is not None and result.diagnosis.kind in KINDS
    json.dumps(result.diagnosis.as_dict(), allow_nan=False)  # JSON-safe
    return result, result.diagnosis


# -- each kind, from the most specific -----------------------------------------------------------

def test_nan_counts_and_inputs(tmp_path, mini, reference):
    result, d = diagnosed(tmp_path, mini, reference, bug="nan")
    assert d.kind == "nan"
    assert result.first_divergence.ref_name == "model.layers.1.mlp.down_proj"
    assert (d.detail["side"], d.detail["nan"], d.detail["inf"], d.detail["numel"]) == (
        "candidate", T, 0, T * HIDDEN)
    assert d.detail["rows"] == list(range(T))
    assert d.detail["inputs"][0]["name"] == "model.layers.1.mlp.down_proj:input.0"
    assert all(i["nonfinite"] == 0 for i in d.detail["inputs"])
    assert f"{T} NaN/Inf" in d.title and "is finite" in d.title


def test_all_zeros(tmp_path, mini, reference):
    result, d = diagnosed(tmp_path, mini, reference, bug="zeros")
    assert d.kind == "zeros" and d.detail["all_zero"] is True
    assert result.first_divergence.ref_name == "model.layers.0.self_attn.v_proj"
    assert d.detail["zeroed"] == d.detail["nonzero_in_reference"] == T * KVH * D
    assert "all zeros" in d.title


def test_stale_hidden_state(tmp_path, mini, reference):
    result, d = diagnosed(tmp_path, mini, reference, bug="stale")
    assert d.kind == "stale"
    assert (result.first_divergence.step, result.first_divergence.ref_name) == (
        2, "model.layers.1.mlp.down_proj")
    assert (d.detail["step"], d.detail["previous_step"]) == (2, 1)
    assert d.title.endswith("at step 2 is its value from step 1: not updated")


def test_heads_not_transposed_is_a_layout(tmp_path, mini, reference):
    result, d = diagnosed(tmp_path, mini, reference, bug="heads")
    assert d.kind == "layout"
    assert result.first_divergence.ref_name == "model.layers.0.self_attn.o_proj:input.0"
    assert d.detail["transform"] == f"reshape({H}, {T}, {D})|permute(1, 0, 2)|reshape({T}, {H * D})"
    assert d.detail["stored"] == f"({H} heads, {T}, {D} head_dim)"
    assert d.detail["error_after"] < 1e-6


def test_blocked_qk_norm(tmp_path, mini, reference):
    result, d = diagnosed(tmp_path, mini, reference, bug="blocked")
    assert d.kind == "blocked_norm"
    assert result.first_divergence.ref_name == "model.layers.0.self_attn.q_norm"
    assert (d.detail["block"], d.detail["head_dim"]) == (16, D)
    assert d.detail["input_mismatch"] < 1e-3  # the factors are rms(head) / rms(block) of q
    assert d.title.startswith(f"QK-norm computed over 16-element blocks instead of the head's "
                              f"{D} elements")


def test_blocked_qk_norm_recorded_in_blocks_is_gathered(tmp_path, mini, reference):
    result, d = diagnosed(tmp_path, mini, reference, bug="blocked", names="meta")
    first = result.first_divergence
    assert first.ref_name == "model.layers.0.self_attn.q_norm"
    assert first.cand_name == "layers.0.attention.q_norm.block0"
    assert first.ref_transform.endswith("block(16, 0)")
    assert d.kind == "blocked_norm" and d.detail["block"] == 16
    assert d.detail["blocks_compared"] == T * H * D // 16
    assert any("gathered from" in e for e in d.evidence)


def test_blocked_qk_norm_from_one_recorded_block(tmp_path, mini, reference):
    # seed 001: only block 0 of layer 0's q_norm is logged; its factor is that of an RMSNorm
    # over the block instead of the head, computed from the reference's q
    result, d = diagnosed(tmp_path, mini, reference, bug="blocked", names="meta", blocks=1)
    assert d.kind == "blocked_norm" and (d.detail["block"], d.detail["head_dim"]) == (16, D)
    assert d.detail["blocks_compared"] == 1 and d.detail["input_mismatch"] < 1e-3


def test_statistics_only_still_diagnosed(tmp_path, mini, reference):
    result, d = diagnosed(tmp_path, mini, reference, bug="weight", data=False)
    assert d.kind == "op" and result.first_divergence.metrics is None


def test_positions_fed_as_tokens(tmp_path, mini, reference):
    result, d = diagnosed(tmp_path, mini, reference, bug="swapped")
    assert d.kind == "embedding" and d.detail["arange"] is True
    assert d.detail["candidate_ids"] == list(range(T))
    assert d.title == f"the candidate was fed positions as token ids (0..{T - 1}) at step 0"


def test_embeddings_differ_while_ids_agree(tmp_path, mini, reference):
    result, d = diagnosed(tmp_path, mini, reference, bug="embed_scale")
    assert result.first_divergence.ref_name == "model.embed_tokens"
    assert d.kind == "embedding" and d.detail["scale"] == pytest.approx(3.0)
    assert d.detail["positions_differing"] == list(range(T))
    assert d.title == "the embeddings differ at step 0 while the token ids agree"


def test_decode_token_not_updated(tmp_path, mini, reference):
    result, d = diagnosed(tmp_path, mini, reference, bug="stale_token")
    assert d.kind == "decode" and d.detail["cause"] == "token"
    assert d.detail["candidate_token"] == [PROMPT[-1]] and d.detail["repeats_previous"]


@pytest.mark.parametrize("tables", [True, False])
def test_decode_position_off_by_one(tmp_path, mini, reference, tables):
    result, d = diagnosed(tmp_path, mini, reference, bug="position", tables=tables)
    assert result.first_divergence.step == 1
    assert d.kind == "decode" and d.detail["cause"] == "position" and d.detail["offset"] == 1
    if tables:  # looked up in the reference's cos table
        assert (d.detail["reference_position"], d.detail["candidate_position"]) == (T, T + 1)
    else:  # from the rotation of q itself
        assert result.first_divergence.ref_name == "model.layers.0.self_attn.rope:0"


def test_decode_kv_cache(tmp_path, mini, reference):
    """Decode attends before writing its own K/V: attention re-enacted from the reference's
    q, k and v without each query's own key reproduces it (it was the decode rule's 'the KV
    cache (written slot or read range)')."""
    result, d = diagnosed(tmp_path, mini, reference, bug="kv_cache")
    assert result.first_divergence.ref_name == "model.layers.0.self_attn.o_proj:input.0"
    assert d.kind == "mask" and d.detail["candidate"] == {"own_key": False}, d.title
    assert d.detail["layer"] == 0 and "the key just written is not read" in d.title


def test_rope_pairing(tmp_path, mini, reference):
    result, d = diagnosed(tmp_path, mini, reference, bug="interleaved")
    assert d.kind == "rope" and d.detail["cause"] == "pairing"
    assert (d.detail["reference_pairing"], d.detail["candidate_pairing"]) == (
        "halfsplit", "interleaved")
    assert any("position 0 agrees" in e for e in d.evidence)


@pytest.mark.parametrize("tables", [True, False])
def test_rope_base(tmp_path, mini, reference, tables):
    result, d = diagnosed(tmp_path, mini, reference, bug="rope_base", tables=tables)
    assert d.kind == "rope" and d.detail["cause"] == "base"
    assert d.detail["candidate_base"] == pytest.approx(10000.0, rel=1e-3)
    assert d.detail["reference_base"] == pytest.approx(BASE, rel=1e-3)
    assert "RoPE base 1e+04 where the reference uses 5e+05" in d.title


def test_logits_bunched_at_the_end_of_the_vocabulary(tmp_path, mini, reference):
    result, d = diagnosed(tmp_path, mini, reference, bug="logits_tail")
    assert d.kind == "logits"
    assert d.detail["argmax_tail_candidate"] == 1.0
    assert min(d.detail["candidate_argmax"]) >= 0.75 * VOCAB
    assert "bunch at the end of the vocabulary" in d.title


def test_weight_change_is_an_op_not_a_layout(tmp_path, mini, reference):
    result, d = diagnosed(tmp_path, mini, reference, bug="weight")
    assert d.kind == "op"
    assert d.detail["input"] == "model.layers.1.post_attention_layernorm"
    assert d.detail["input_error"] == 0 and d.detail["features"] == [5]
    assert "scale" not in d.detail


def test_scaled_weight_is_an_op_with_its_factor(tmp_path, mini, reference):
    result, d = diagnosed(tmp_path, mini, reference, bug="scaled")
    assert d.kind == "op" and d.detail["scale"] == pytest.approx(1.5, rel=1e-5)
    assert "1.5 x the reference" in d.title


# -- no diagnosis, and never a lost comparison ------------------------------------------------

def test_drift_has_no_diagnosis(tmp_path, mini, reference):
    ref, tokens = reference
    run(tmp_path / "cand", mini, forced=tokens[:-1], dtype=np.float16)
    result = lockstep.compare(ref, tmp_path / "cand")
    assert result.verdict == "drift" and result.diagnosis is None
    assert report_dict(result)["diagnosis"] is None


def test_a_bug_in_the_diagnosis_never_costs_the_comparison(tmp_path, mini, reference,
                                                            monkeypatch):
    def broken(*args: Any) -> None:
        raise ZeroDivisionError("boom")

    run(tmp_path / "cand", mini, bug="weight", forced=reference[1][:-1])
    monkeypatch.setattr(diagnosis_module, "diagnose", broken)
    with pytest.raises(ZeroDivisionError):  # under pytest the error surfaces
        lockstep.compare(reference[0], tmp_path / "cand")
    monkeypatch.delenv("LOCKSTEP_STRICT", raising=False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = lockstep.compare(reference[0], tmp_path / "cand")
    assert result.verdict == "diverged" and result.diagnosis is None
    assert any("the diagnosis failed (ZeroDivisionError: boom)" in str(w.message)
               for w in caught)



def test_strict_is_an_explicit_choice(tmp_path, mini, reference, monkeypatch):
    def broken(*args: Any) -> None:
        raise ZeroDivisionError("boom")

    run(tmp_path / "cand", mini, bug="weight", forced=reference[1][:-1])
    monkeypatch.setattr(diagnosis_module, "diagnose", broken)
    monkeypatch.delenv("LOCKSTEP_STRICT", raising=False)
    with pytest.raises(ZeroDivisionError):  # asked for, whatever the environment says
        lockstep.compare(reference[0], tmp_path / "cand", strict=True)
    monkeypatch.setenv("LOCKSTEP_STRICT", "1")
    with pytest.warns(RuntimeWarning, match="the diagnosis failed"):
        result = lockstep.compare(reference[0], tmp_path / "cand", strict=False)
    assert result.verdict == "diverged" and result.diagnosis is None


def test_diagnose_runs_the_rules_it_is_given_in_order(tmp_path, mini, reference):
    result, d = diagnosed(tmp_path, mini, reference, bug="heads")
    assert d.kind == "layout"
    with lockstep.open_dump(reference[0]) as ref, lockstep.open_dump(tmp_path / "cand") as cand:
        case = Case(result.first_divergence, result.results, ref, cand, tokens=result.tokens)
        assert diagnose(case) == d  # RULES, the default
        assert diagnose(case, rules=(rules.op, rules.layout)).kind == "op"
        assert diagnose(case, rules=(rules.zeros, rules.stale)) is None
        assert diagnose(case, rules=()) is None

        @rule("zeros")
        def mislabelled(case: Case) -> Diagnosis | None:
            return rules.op(case)

        with pytest.raises(AssertionError, match="declares"):
            diagnose(case, rules=(mislabelled,))
    assert [r.name for r in RULES][-1] == "op" and set(KINDS) == {
        k for r in RULES for k in r.kinds}


def test_reports_show_the_diagnosis(tmp_path, mini, reference):
    result, d = diagnosed(tmp_path, mini, reference, bug="heads")
    assert report_dict(result)["diagnosis"] == d.as_dict()
    console = Console(width=200, record=True, color_system=None)
    console.print(ComparisonReport(result))
    text = console.export_text()
    assert "diagnosis" in text and "LAYOUT" in text and d.title in text
    assert "what to check" in text and "1. " in text
    assert text.index("first divergence") < text.index("LAYOUT")


# -- real tiny transformers models ------------------------------------------------------------

@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_transformers_decode_position_shift(tmp_path, family):
    model = tiny(family)
    tokens = greedy(model, tmp_path / "ref")
    greedy(variant(model), tmp_path / "cand", position_shift=1, forced=tokens)
    d = lockstep.compare(tmp_path / "ref", tmp_path / "cand").diagnosis
    assert d is not None and d.kind == "decode" and d.detail["cause"] == "position"
    at = len(HF_PROMPT)  # the position of the first decode token
    assert (d.detail["reference_position"], d.detail["offset"]) == (at, 1)
    assert d.title == (f"decode step 1 rotates Q/K for position {at + 1} where the reference "
                       f"uses {at} (off by +1)")


def test_transformers_changed_weight_is_an_op(tmp_path):
    model = tiny("llama")
    greedy(variant(model, torch.float64), tmp_path / "ref")
    bad = variant(model)
    with torch.no_grad():
        bad.model.layers[1].mlp.up_proj.weight[7, 3] += 1.0
    greedy(bad, tmp_path / "cand")
    d = lockstep.compare(tmp_path / "ref", tmp_path / "cand").diagnosis
    assert d is not None and d.kind == "op"
    assert d.detail["features"] == [7] and d.detail["op"] == "up"
    assert d.detail["input"] == "model.layers.1.post_attention_layernorm"
