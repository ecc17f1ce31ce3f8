"""Tensor kinds (align.kinds): the one list the name tables, pairing and diagnosis match on."""

from __future__ import annotations

import json
import re

import pytest

from lockstep.align import kinds
from lockstep.align.kinds import Canonical, Kind
from lockstep.align.roles import Role, role_of_name
from lockstep.align.tables import (
    TABLES,
    TRANSFORMERS_LLAMA,
    NameTable,
    Rule,
    table_canonical,
)
from lockstep.compare.case import is_logits


def test_a_template_naming_no_kind_fails_when_the_rule_is_made():
    with pytest.raises(ValueError, match="names no tensor kind"):
        Rule(re.compile(r"blk\.(\d+)\.wq"), "layers.{0}.qq")
    with pytest.raises(ValueError, match="names no tensor kind"):
        NameTable("typo", (Rule(re.compile("out"), "logit"),))
    with pytest.raises(ValueError, match="names no tensor kind"):
        Rule(re.compile(r"e\.(\d+)\.(\d+)"), "layers.{0}.expert.{1}.gate")  # "experts"
    rule = Rule(re.compile(r"e\.(\d+)\.(\d+)\.w1"), "layers.{0}.experts.{1}.gate")
    assert rule.kind is Kind.GATE
    assert rule.match("e.3.7.w1") == ("layers.3.experts.7.gate", None, None)


def test_every_rule_of_every_table_names_a_kind():
    for table in TABLES:
        assert table.kinds <= set(Kind), table.name
        assert all(kinds.parse(r.canonical.format(*"00")) for r in table.rules), table.name
    assert {Kind.Q, Kind.FINAL_NORM, Kind.LOGITS} <= TRANSFORMERS_LLAMA.kinds
    assert Kind.POSITIONS not in TRANSFORMERS_LLAMA.kinds  # guessed only


def test_a_kind_is_its_canonical_name_in_dicts_strings_and_json():
    assert Kind.Q_ROPE == "q_rope" and hash(Kind.Q_ROPE) == hash("q_rope")
    assert {"q_rope": 1}[Kind.Q_ROPE] == 1 and Kind.Q_ROPE in ("k_rope", "q_rope")
    assert f"{Kind.Q_ROPE}|{Kind.LOGITS:>8}" == "q_rope|  logits"
    assert str(Kind.FINAL_NORM) == "final_norm"
    assert json.dumps({Kind.LOGITS: [Kind.EMBED]}) == '{"logits": ["embed"]}'
    assert len({k.value for k in Kind}) == len(Kind)


def test_canonical_names_parse_into_layer_scope_and_kind():
    assert kinds.parse("layers.3.experts.2.gate") == Canonical(3, "experts.2", Kind.GATE)
    assert kinds.parse("layers.3.experts.2.gate").op == "experts.2.gate"
    assert kinds.parse("layers.0.experts.gate_act") == Canonical(0, "experts", Kind.GATE_ACT)
    assert kinds.parse("layers.1.shared_expert_gate") == Canonical(1, "", Kind.SHARED_EXPERT_GATE)
    assert kinds.parse("final_norm") == Canonical(None, "", Kind.FINAL_NORM)
    assert kinds.parse("layers.0.attention_norm") is None
    assert kinds.parse("model.norm") is None
    assert kinds.kind_of("layers.5.shared_expert.out") is Kind.OUT
    assert kinds.kind_of(None) is None
    assert kinds.split_layer("layers.12.whatever.x") == (12, "whatever.x")


def test_names_no_table_knows_are_guessed_as_kinds():
    assert kinds.guess("decoder.layer_4.attention.xq_rot") == (4, Kind.Q_ROPE)
    assert kinds.guess("blk.2.attn_k_norm") == (2, Kind.K_NORM)
    assert kinds.guess("transformer.final_rmsnorm") == (None, Kind.FINAL_NORM)
    assert kinds.guess("blk_0.rmsnorm") == (0, Kind.ATTN_NORM)
    assert kinds.guess("rotary.sin") == (None, Kind.ROPE_SIN)
    assert kinds.guess("pos_ids") == (None, Kind.POSITIONS)
    assert kinds.guess("something") == (None, None)
    # the last part of a name that says "logits" in any engine
    for name in ("lm_head", "model.lm_head", "run:logits", "result_output", "output_logits"):
        assert kinds.named_kind(name) is Kind.LOGITS and is_logits(name, {}), name
    for name in ("lm_head.weight", "output", "logits_scale"):
        assert kinds.named_kind(name) is None and not is_logits(name, {}), name
    assert is_logits("output", {"logits": ["output"]})


def test_roles_are_kinds_from_the_tables_before_any_guess():
    role = role_of_name("model.layers.1.self_attn.q_proj")
    assert role == Role(1, Kind.Q) and isinstance(role.op, Kind)
    assert role_of_name("transformer.wte") == Role(None, Kind.EMBED)  # tok_embed reads as embed
    assert role_of_name("ffn_moe_out-3") == Role(3, Kind.EXPERTS_OUT)  # a table's
    assert role_of_name("layers.1.feed_forward.experts.2.w1").op == "experts.2.gate"
    assert role_of_name("my.layer7.query") == Role(7, Kind.Q)  # a guess
    assert table_canonical("result_norm") == "final_norm"
    assert table_canonical("nothing.known") is None
