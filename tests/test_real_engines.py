"""Engines shaped like the ones users write, against transformers, with no mapping file.

The engines live in tests/engines/: small, readable PyTorch (or numpy) code written for these
tests, each with the shapes real engines have (flat activations, fused projections, norms
that add the residual, logits outside forward, a sampler, probes with their own names).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

import lockstep
from engines.nano_vllm import LLM
from engines.nano_vllm import SPEC as NANO_SPEC
from lockstep.align.steps import fed_per_step
from lockstep.workflows.capture import capture
from lockstep.zoo.families import tiny_family_model
from models import save_tiny

PROMPT = [3, 17, 42, 7, 99, 5, 64, 11, 200]  # 9 tokens: prefill spans three KV blocks of 4
DECODE = 3
FAMILIES = ["qwen3", "llama"]


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def references(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, Path, list]]:
    """Per family: the saved model, transformers' dump of it and the tokens it chose."""
    root = tmp_path_factory.mktemp("real-engines")
    out = {}
    for family in (*FAMILIES, "gemma2"):
        model = tiny_family_model(family, root / family) if family == "gemma2" else \
            save_tiny(family, root / family)
        ref = root / f"ref-{family}.lsd"
        tokens = capture(f"hf:{model}", str(ref), tokens=PROMPT, decode=DECODE)
        out[family] = (model, ref, tokens)
    return out


def nano_vllm(model: Path, out: Path, tokens: list[int], bug: str | None = None,
              **options: Any) -> list[int]:
    """Record the nano-vLLM engine the way a user would: watch the model and the sampler,
    feed the reference's tokens."""
    llm = LLM(model, bug=bug, **options)
    with lockstep.record(out, meta=llm.meta) as rec:
        rec.watch(llm.model)
        rec.watch(llm.sampler)
        chosen = llm.generate(PROMPT, DECODE, forced=tokens[:DECODE])
        rec.add_meta(generated_token_ids=chosen)
    return chosen


@pytest.mark.parametrize("family", FAMILIES)
def test_nano_vllm_bug_free_matches(tmp_path, references, family):
    model, ref, tokens = references[family]
    assert nano_vllm(model, tmp_path / "cand.lsd", tokens) == tokens
    result = lockstep.compare(ref, tmp_path / "cand.lsd")
    assert result.verdict == "match", (result.first_divergence, result.coverage)
    with lockstep.open_dump(tmp_path / "cand.lsd") as cand:
        assert cand.steps == [0, 1, 2, 3]  # compute_logits and the sampler stay in their step
    by_ref = {(p.step, p.ref_name): p for p in result.results}
    # the fused-residual norm's two outputs, each with its own reference record
    assert by_ref[(0, "model.layers.0.post_attention_layernorm")].cand_name == \
        "model.layers.0.post_attention_layernorm:0"
    assert by_ref[(0, "model.layers.0.post_attention_layernorm:input.0")].cand_name == \
        "model.layers.0.post_attention_layernorm:1"
    # SiluAndMul is the down projection's input, not transformers' act_fn (silu(gate) alone)
    assert by_ref[(0, "model.layers.0.mlp.down_proj:input.0")].cand_name == \
        "model.layers.0.mlp.act_fn"
    assert (0, "model.layers.0.mlp.act_fn") not in by_ref
    # the fused projections, one part each; the residual is the previous layer's output
    for op in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "mlp.gate_proj",
               "mlp.up_proj"):
        pair = by_ref[(1, f"model.layers.1.{op}")]
        assert pair.cand_name.endswith(("qkv_proj", "gate_up_proj")) and pair.error < 1e-5
    assert by_ref[(2, "model.layers.0")].cand_name == "model.layers.1.input_layernorm:1"
    # the logits: the last position at prefill, in the step they belong to
    assert by_ref[(0, "lm_head")].cand_name == "lm_head" and by_ref[(0, "lm_head")].error < 1e-5
    # an int64 positions probe pairs with no float tensor
    assert all(p.cand_name != "positions" for p in result.results)
    assert all(p.error < 1e-4 for p in result.results)


# bug -> (step, canonical op of the first divergence, diagnosis)
NANO_BUGS = {
    "decode_position": (1, "layers.0.q_rope", "decode"),
    "kv_slot": (1, "layers.0.attn_heads", "decode"),
    "swapped_args": (0, "embed", "embedding"),
    "layer_not_loaded": (0, "layers.1.attn_norm", "op"),
    "greedy_temperature": (0, "logits", "sampling"),
    # layer 1 runs and returns its inputs: its output is the final norm's residual sum
    "skip_layer": (0, "layers.1.out", "op"),
}


# every bug on Qwen3 and Llama; on the vLLM-shaped Gemma 2, a loader and a decode bug
LOCALIZED = [(f, b) for b in sorted(NANO_BUGS) for f in FAMILIES] + [
    ("gemma2", "layer_not_loaded"), ("gemma2", "kv_slot")]


@pytest.mark.parametrize("family,bug", LOCALIZED, ids=[f"{b}-{f}" for f, b in LOCALIZED])
def test_nano_vllm_bug_localized(tmp_path, references, family, bug):
    model, ref, tokens = references[family]
    nano_vllm(model, tmp_path / "cand.lsd", tokens, bug=bug)
    result = lockstep.compare(ref, tmp_path / "cand.lsd")
    step, canonical, kind = NANO_BUGS[bug]
    first = result.first_divergence
    assert result.verdict == "diverged"
    assert first is not None and (first.step, first.canonical) == (step, canonical), first
    assert result.diagnosis is not None and result.diagnosis.kind == kind, result.diagnosis
    if bug == "skip_layer":  # before: the final norm, 'its input model.layers.0 agrees'
        assert first.cand_name == "model.norm:1", first
        assert result.diagnosis.detail["equals_input"] == \
            "model.layers.0 ~ model.layers.1.input_layernorm:1", result.diagnosis


def test_the_last_layer_output_is_paired_only_when_it_feeds_the_final_norm(tmp_path,
                                                                          references):
    """The final norm's residual sum (``model.norm:1``) is the model's last layer output:
    paired with the reference's record of the last layer it shows only once that record is
    seen to be what the reference's final norm normalized. Both sides recorded with
    ``layers=[0]`` end at layer 0, not the model's last: nothing is paired with it, and the
    bug-free run matches."""
    model, _, tokens = references["llama"]
    ref = tmp_path / "ref.lsd"
    capture(f"hf:{model}", str(ref), tokens=PROMPT, decode=DECODE, layers=[0])
    nano = tmp_path / "cand.lsd"
    capture(NANO_SPEC, str(nano), tokens=PROMPT, decode=DECODE, forced=tokens[:DECODE],
            layers=[0], model=str(model))
    result = lockstep.compare(ref, nano)
    assert result.verdict == "match", result.first_divergence
    assert not any(p.cand_name == "model.norm:1" for p in result.results)
    full = lockstep.compare(references["llama"][1], _recorded(model, tmp_path, tokens))
    paired = [p for p in full.results if p.cand_name == "model.norm:1"]
    assert [p.ref_name for p in paired] == ["model.layers.1"] * (DECODE + 1), paired


def _recorded(model: Path, tmp_path: Path, tokens: list[int]) -> Path:
    out = tmp_path / "whole.lsd"
    nano_vllm(model, out, tokens)
    return out


def test_nano_vllm_gemma2_bug_free_matches(tmp_path, references):
    """A correct vLLM-shaped Gemma 2 matches: its plain post-attention norm, its fused
    pre-feedforward norm and its post-feedforward norm each pair with transformers' own."""
    model, ref, tokens = references["gemma2"]
    assert nano_vllm(model, tmp_path / "cand.lsd", tokens) == tokens
    result = lockstep.compare(ref, tmp_path / "cand.lsd")
    assert result.verdict == "match", (result.first_divergence, result.coverage)
    by_ref = {(p.step, p.ref_name): p for p in result.results}
    layer = "model.layers.1"
    assert by_ref[(0, f"{layer}.post_attention_layernorm")].cand_name == \
        f"{layer}.post_attention_layernorm"
    assert by_ref[(0, f"{layer}.pre_feedforward_layernorm")].cand_name == \
        f"{layer}.pre_feedforward_layernorm:0"
    assert by_ref[(0, f"{layer}.post_feedforward_layernorm")].cand_name == \
        f"{layer}.post_feedforward_layernorm"
    assert by_ref[(3, f"{layer}.self_attn.o_proj")].error < 1e-5  # decode past the window
    assert all(p.error < 1e-4 for p in result.results)


def _cli(*args: Any) -> Any:
    import os
    import subprocess
    import sys

    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [str(Path(lockstep.__file__).parents[1]), os.environ.get("PYTHONPATH", "")]))
    return subprocess.run([sys.executable, "-m", "lockstep.cli.main", *map(str, args)],
                          capture_output=True, text=True, env=env, timeout=300)


def test_nano_vllm_bug_free_from_the_command_line(tmp_path, references):
    model, ref, tokens = references["qwen3"]
    nano_vllm(model, tmp_path / "cand.lsd", tokens)
    done = _cli("compare", ref, tmp_path / "cand.lsd", "--json", tmp_path / "r.json")
    assert done.returncode == 0, done.stdout + done.stderr
    assert "MATCH" in done.stdout


def test_a_padded_vocabulary_is_compared_over_the_references_columns(tmp_path, references):
    """The engine pads its vocabulary to a multiple of 128 (320 to 384 rows, zeros), as
    vLLM's ParallelLMHead does, and its lm_head records the padded logits. They were
    'incomparable: shapes differ' (the logits never compared: INCOMPLETE); their first 320
    columns are the reference's, so the pair takes them, and the comparison is a MATCH.
    The same padded weights are equal to the checkpoint's, padded with zeros."""
    model, ref, tokens = references["llama"]
    nano_vllm(model, tmp_path / "cand.lsd", tokens, vocab_multiple=128)
    result = lockstep.compare(ref, tmp_path / "cand.lsd")
    assert result.verdict == "match", (result.first_divergence, result.coverage.gaps)
    heads = [p for p in result.results if p.ref_name == "lm_head"]
    assert len(heads) == DECODE + 1
    assert all(p.cand_transform == "slice(-1, 0, 320)" and p.error < 1e-5 for p in heads)
    check = lockstep.check_loaded(LLM(model, vocab_multiple=128).model, model)
    assert check, check.problems
    assert {p.transform for p in check.params if "embed" in p.name or "lm_head" in p.name} == {
        "padded to 384 (dim 0)"}
    # a candidate whose logits differ in the reference's columns still diverges there
    bad = LLM(model, vocab_multiple=128)
    with torch.no_grad():
        bad.model.lm_head.weight[:320] *= 1.5
    with lockstep.record(tmp_path / "bad.lsd", meta=bad.meta) as rec:
        rec.watch(bad.model)
        bad.generate(PROMPT, DECODE, forced=tokens[:DECODE])
    first = lockstep.compare(ref, tmp_path / "bad.lsd").first_divergence
    assert first is not None and first.ref_name == "lm_head"


def test_a_chunked_prefill_is_compared_over_every_prompt_token(tmp_path, references):
    """The engine feeds the 9-token prompt in chunks of 4 (vLLM's chunked prefill): three
    forwards, three steps. They were compared as the last chunk's one token against the
    reference's prefill, and the chunks before it left out: a MATCH that had looked at one
    token of nine. Joined along their tokens, every token is compared."""
    model, ref, tokens = references["llama"]
    assert nano_vllm(model, tmp_path / "cand.lsd", tokens, prefill_chunk=4) == tokens
    result = lockstep.compare(ref, tmp_path / "cand.lsd")
    assert result.verdict == "match", (result.first_divergence, result.coverage.gaps)
    (side,) = result.chunks.sides
    assert [(g.steps, g.sizes) for g in side.groups] == [((0, 1, 2), (4, 4, 1))]
    assert side.left_out == ()
    by_ref = {(p.step, p.ref_name): p for p in result.results}
    assert by_ref[(0, "model.layers.1.self_attn.o_proj")].cand_shape[0] == len(PROMPT)
    assert by_ref[(0, "lm_head")].cand_shape[0] == 1  # the last position's logits
    assert {p.step for p in result.results} == set(range(DECODE + 1))


# a later chunk's bug -> the canonical op of the first divergence (in step 0, chunk 2)
CHUNK_BUGS = {"chunk_causal": "layers.0.attn_heads", "chunk_positions": "layers.0.q_rope"}


@pytest.mark.parametrize("bug", sorted(CHUNK_BUGS))
def test_a_later_chunks_bug_is_found_in_that_chunk(tmp_path, references, bug):
    """A later chunk masked top-left (SDPA's is_causal with fewer queries than keys), or fed
    positions from 0 again. Compared as the last chunk alone, the first bug surfaced a layer
    late (at layer 1's attention, through the cache) and the second not at layer 0."""
    model, ref, tokens = references["llama"]
    nano_vllm(model, tmp_path / "cand.lsd", tokens, bug=bug, prefill_chunk=4)
    result = lockstep.compare(ref, tmp_path / "cand.lsd")
    first = result.first_divergence
    assert result.verdict == "diverged"
    assert (first.step, first.canonical) == (0, CHUNK_BUGS[bug]), first
    assert result.chunks.blamed[0] == 1 and result.chunks.chunk_errors[0][1] < 1e-5
    assert result.diagnosis.kind == "chunk", result.diagnosis
    assert result.diagnosis.detail["chunk"] == 1
    if bug == "chunk_positions":
        assert "positions of chunk 2" in result.diagnosis.checks[0]
    else:
        assert "attention mask of chunk 2" in result.diagnosis.checks[0]


def prefix_cached(model: Path, out: Path, tokens: list[int], bug: str | None = None,
                  **options: Any) -> list[int]:
    """The nano engine with prefix caching: a prompt sharing the first KV block (4 tokens)
    is served first, unrecorded, so the recorded prefill computes tokens 4-8 alone."""
    llm = LLM(model, bug=bug, prefix_cache=True, **options)
    llm.serve_quietly(PROMPT[:4] + [1, 2, 3, 4, 5])
    with lockstep.record(out, meta=llm.meta) as rec:
        rec.watch(llm.model)
        rec.watch(llm.sampler)
        return llm.generate(PROMPT, DECODE, forced=tokens[:DECODE])


# bug -> (canonical op of the first divergence, how the cut was found)
PREFIX_BUGS = {None: (None, "positions"), "chunk_causal": ("layers.0.attn_heads", "positions"),
               "chunk_positions": ("layers.0.q_rope", "ids")}


@pytest.mark.parametrize("bug", list(PREFIX_BUGS), ids=lambda b: str(b))
def test_a_prefill_after_a_cached_prefix(tmp_path, references, bug):
    """vLLM's prefix caching: the recorded prefill feeds tokens 4-8 at positions 4-8. Before,
    the reference's 9 rows against the candidate's 5 were 'shapes differ' and the
    comparison incomplete; now the reference's prefill is compared from token 4 on. A mask
    that ignores the cached keys, or positions from 0, are found at layer 0."""
    model, ref, tokens = references["llama"]
    assert prefix_cached(model, tmp_path / "cand.lsd", tokens, bug=bug) == tokens
    result = lockstep.compare(ref, tmp_path / "cand.lsd")
    op, how = PREFIX_BUGS[bug]
    (cut,) = result.chunks.cuts
    assert (cut.side, cut.step, cut.start, cut.how) == ("reference", 0, 4, how)
    if op is None:
        assert result.verdict == "match", (result.first_divergence, result.coverage.gaps)
        by_ref = {(p.step, p.ref_name): p for p in result.results}
        assert by_ref[(0, "model.layers.1.self_attn.o_proj")].ref_shape[-2] == 5
        return
    first = result.first_divergence
    assert result.verdict == "diverged" and (first.step, first.canonical) == (0, op), first
    assert result.diagnosis.kind == "chunk" and result.diagnosis.detail["cached_prefix"] == 4


@pytest.mark.parametrize("bug", [None, "chunk_causal"], ids=lambda b: str(b))
def test_speculative_decoding_against_one_token_steps(tmp_path, references, bug):
    """The engine decodes speculatively: its first decode step feeds the next token and 2
    drafts (200, then 7: a wrong guess) and keeps 1. The rejected draft's rows are cut off,
    and the reference's decode steps 1 and 2 are joined to meet the verify step. Before, no
    step after the prefill was compared the right way: steps were matched by index, the
    verify step's 3 rows against one reference row. A verify step masked top-left (SDPA's
    is_causal with fewer queries than keys) diverges at it, at layer 0's attention."""
    model, ref, tokens = references["llama"]
    llm = LLM(model, bug=bug, speculative=2)
    llm.proposer = lambda seen, k: [200, 7][:k]
    with lockstep.record(tmp_path / "cand.lsd", meta={**llm.meta, "prompt_token_ids": PROMPT}
                         ) as rec:
        rec.watch(llm.model)
        rec.watch(llm.sampler)
        chosen = llm.generate(PROMPT, DECODE, forced=tokens[:DECODE])
        rec.add_meta(generated_token_ids=chosen)
    with lockstep.open_dump(tmp_path / "cand.lsd") as cand:
        assert [len(ids) for ids, _ in fed_per_step(cand).values()] == [len(PROMPT), 3, 1]
    result = lockstep.compare(ref, tmp_path / "cand.lsd")
    assert [(d.step, d.fed, d.kept) for d in result.chunks.drafts] == [(1, 3, 2)]
    (side,) = result.chunks.sides
    assert side.side == "reference" and [g.steps for g in side.groups] == [(1, 2)]
    if bug is None:
        assert chosen == tokens
        assert result.verdict == "match", (result.first_divergence, result.coverage.gaps)
        assert result.tokens.off_argmax == ()
        return
    first = result.first_divergence
    assert result.verdict == "diverged" and (first.step, first.canonical) == (
        1, "layers.0.attn_heads"), first
    # the mask among the step's tokens, first: step 3, one token on both sides, agrees
    assert result.diagnosis.kind == "chunk" and result.diagnosis.detail["speculative"]
    assert result.diagnosis.detail["one_token_step"] == 3
    assert "attention mask of a decode step fed 2 tokens" in result.diagnosis.checks[0]


def _diff_nano(references: Any, tmp_path: Path, decode: int,
               *options: str) -> tuple[Any, dict[str, Any]]:
    """``lockstep diff`` of transformers' Llama against the nano engine with ``options``,
    which must diverge: (the process, its JSON report)."""
    model, _, _ = references["llama"]
    opts = [a for o in (f"model={model}", *options) for a in ("--cand-opt", o)]
    done = _cli("diff", f"hf:{model}", NANO_SPEC, "--tokens", ",".join(map(str, PROMPT)),
                "--decode", str(decode), *opts, "--out", tmp_path / "out",
                "--json", tmp_path / "r.json")
    assert done.returncode == 1, done.stdout + done.stderr
    return done, json.loads((tmp_path / "r.json").read_text())


def _replayed(report: dict[str, Any], name: str) -> dict[str, Any]:
    """The replay's op of reference name ``name``."""
    return {op["reference"]: op for op in report["replay"]["ops"]}[name]


def test_replay_of_a_speculative_step_runs_the_reference_at_its_last_joined_step(
        tmp_path, references):
    """The verify step (the next token and a draft, the n-gram proposer's) is compared with
    the reference's decode steps 1 and 2 joined. Replay re-ran the reference at step 1 alone,
    whose input is not the joined step's last row: 'no reference record holds this op's
    input'. It re-runs step 2, and the o_proj's error is inherited, as it is."""
    _, report = _diff_nano(references, tmp_path, 3, "speculative=2", "bug=chunk_causal")
    assert report["first_divergence"]["step"] == 1
    assert report["chunks"]["sides"][0]["groups"][0] == {"steps": [1, 2], "tokens": [1, 1],
                                                          "prefill": False}
    o_proj = _replayed(report, "model.layers.0.self_attn.o_proj")
    assert o_proj["inherited"] > 0.1 and o_proj["introduced"] < 1e-5, o_proj


def test_diff_of_a_chunked_engine_from_the_command_line(tmp_path, references):
    """``lockstep diff`` records both engines, joins the chunks, names the chunk and
    replays the reference's ops on the joined step."""
    done, report = _diff_nano(references, tmp_path, 2, "prefill_chunk=4", "bug=chunk_causal")
    assert "one prefill fed in 3 chunks (4+4+1 tokens)" in done.stdout
    assert "starts in the candidate's chunk 2 of 3 (step 1, tokens 4-7)" in \
        report["chunks"]["blame"]
    # the o_proj re-run on the joined step's input: it inherits the error (the last chunk's
    # one row alone holds none of it) and introduces none
    o_proj = _replayed(report, "model.layers.0.self_attn.o_proj")
    assert o_proj["inherited"] > 0.1 and o_proj["introduced"] < 1e-5, o_proj
    assert report["chunks"]["sides"][0]["groups"] == [{"steps": [0, 1, 2],
                                                       "tokens": [4, 4, 1], "prefill": True}]
    assert report["diagnosis"]["kind"] == "chunk"


def test_generate_tells_a_sampler_bug_from_logits_that_part(tmp_path, references):
    """With greedy asked, the nano engine's sampler draws at temperature 1: the tokens it
    chooses part from the reference's while its logits' top tokens agree at every step. The
    summary says both counts (it said 'same top token' of the tokens chosen alone) and the
    sampling line names the logits-to-token step."""
    from rich.console import Console

    from lockstep.generation import Prompt, check_generation
    from lockstep.generation.render import GenerationReport

    model = references["llama"][0]
    result = check_generation(f"hf:{model}", NANO_SPEC, [Prompt(tokens=tuple(PROMPT))],
                              max_new_tokens=8, localize=False, out=tmp_path,
                              cand_options={"model": str(model), "bug": "greedy_temperature"})
    assert not result
    s = result.summary
    assert s.same_argmax == s.steps == 8 and s.same_top < s.steps and s.off_argmax >= 1
    console = Console(width=200, record=True, color_system=None)
    console.print(GenerationReport(result))
    text = " ".join(console.export_text().split())
    assert f"same token {s.same_top}/8 steps" in text
    assert "8/8 on the logits' top tokens" in text and "sampling at" in text


@pytest.mark.parametrize("bug, diagnosis", [
    (None, None),
    ("kv_slot", "the KV cache (written slot or read range)"),
    ("decode_position", "rotates Q/K by +1 position(s)")])
def test_fuzz_drives_nano_vllm_as_a_py_engine(tmp_path, references, bug, diagnosis):
    """``fuzz`` against the engine as a user plugs theirs in (``py:``, decode_logits only):
    bug-free, nothing fails under a float32-tight limit; each decode bug is found at one
    token and two steps, and localized to its cause."""
    from lockstep.fuzz import fuzz

    model = references["llama"][0]
    options = {"model": str(model), **({"bug": bug} if bug else {})}
    result = fuzz(f"hf:{model}", NANO_SPEC, out=tmp_path, budget=12, cand_options=options)
    if bug is None:
        assert result and result.failing == 0 and result.kl_limit < 1e-6
        return
    assert not result and result.failing >= 1
    smallest = min(result.findings, key=lambda f: f.input.key)
    assert (len(smallest.input.tokens), smallest.input.steps) == (1, 2)
    assert smallest.failure.step == 1 and smallest.tensor_step == 1
    assert smallest.diagnosis == "decode" and diagnosis in (smallest.title or "")


def test_replay_refuses_to_feed_a_fused_add_norm_the_references_input_alone(tmp_path, references):
    """The nano-vLLM engine's ``input_layernorm(x, residual)`` adds its residual: run on the
    reference's input with the candidate's own residual still beside it, it is not the same op,
    so the other way is refused with the reason (it gave 0.47 to 1.4 on SmolLM2, errors the
    candidate's norm does not make). Its qkv slices, whose outputs do not fit, say so too."""
    from rich.console import Console

    from lockstep.report import ComparisonReport
    from lockstep.workflows.diff import diff

    model = references["llama"][0]
    result = diff(f"hf:{model}", NANO_SPEC, tmp_path, tokens=PROMPT, decode=1,
                  cand_options={"model": str(model), "bug": "swapped_kv_rows"})
    assert result.verdict == "diverged" and result.replay is not None
    ops = {op.reference: op for op in result.replay.ops}
    norm = ops["model.layers.1.input_layernorm"]
    assert norm.where == "inherited"
    assert norm.reverse is None and "second activation" in (norm.reverse_note or "")
    assert all(op.reverse is None for op in ops.values())
    console = Console(width=200, record=True, color_system=None)
    console.print(ComparisonReport(result))
    text = console.export_text()
    words = " ".join(text.split())
    assert "none of the candidate's ops run on the reference's inputs;" in words
    # each reason names the ops it kept from running
    # (model.norm too: its second output is paired as the last layer's output)
    assert "model.layers.1.input_layernorm, model.norm: it takes a second activation" in words


def test_sglang_logits_in_a_dataclass_are_recorded_and_compared(tmp_path, references):
    """SGLang's logits processor is handed the lm_head and uses its weight (the lm_head
    module never runs) and returns ``LogitsProcessorOutput(next_token_logits=...)``: the
    logits are recorded from the dataclass's field and paired with transformers' lm_head,
    so the verdict rests on them (before, they were not recorded at all, and the verdict was
    incomplete)."""
    model, ref, tokens = references["llama"]
    llm = LLM(model, logits="sglang")
    out = tmp_path / "sglang.lsd"
    with lockstep.record(out, meta=llm.meta) as rec:
        rec.watch(llm.model)
        llm.generate(PROMPT, DECODE, forced=tokens[:DECODE])
    with lockstep.open_dump(out) as dump:
        names = {r.name for r in dump.in_step(0)}
    assert "logits_processor:next_token_logits" in names and "lm_head" not in names
    result = lockstep.compare(ref, out)
    assert result.verdict == "match", (result.first_divergence, result.coverage)
    logits = [p for p in result.results if p.cand_name == "logits_processor:next_token_logits"]
    assert len(logits) == DECODE + 1 and all(p.ref_name == "lm_head" for p in logits)


# -- a module-less decode VM: probes with its own tags, QK-norm in 16-element blocks ---------

BLOCK_RULES = """\
# docs/mapping.md's rule for 16-element blocks: every block pairs with its slice
[[rule]]
cand = 'L(\\d+)\\.qn\\.b(\\d+)'
ref = "model.layers.{1}.self_attn.q_norm"
ref_transform = "block(16, {2})"

[[rule]]
cand = 'L(\\d+)\\.kn\\.b(\\d+)'
ref = "model.layers.{1}.self_attn.k_norm"
ref_transform = "block(16, {2})"
"""


def decode_vm(model: Path, out: Path, tokens: list[int], bug: str | None = None) -> list[int]:
    from engines.decode_vm import DecodeVM

    vm = DecodeVM(model, bug=bug)
    with lockstep.record(out, meta={"engine": "decode-vm"}) as rec:
        chosen = vm.generate(rec, PROMPT, DECODE, forced=tokens[:DECODE])
        rec.add_meta(generated_token_ids=chosen)
    return chosen


@pytest.mark.parametrize("mapped", [False, True], ids=["no-mapping", "mapping"])
@pytest.mark.parametrize("bug", [None, "blocked_qk_norm"])
def test_decode_vm(tmp_path, references, bug, mapped):
    from lockstep.align.mapping import load_mapping

    model, ref, tokens = references["qwen3"]
    decode_vm(model, tmp_path / "vm.lsd", tokens, bug=bug)
    mapping = None
    if mapped:
        (tmp_path / "vm.toml").write_text(BLOCK_RULES)
        mapping = load_mapping(tmp_path / "vm.toml")
    result = lockstep.compare(ref, tmp_path / "vm.lsd", mapping=mapping)
    blocks = [p for p in result.results if p.step == 1 and ".qn.b" in p.cand_name
              and p.cand_name.startswith("L0.")]
    assert {p.ref_name for p in blocks} == {"model.layers.0.self_attn.q_norm"}
    if bug is None or mapped:  # (with the bug and no mapping, the blocks exist only where
        # the bug is, and values alone place 10 of the 16: a known limit)
        assert len(blocks) == 16  # every block of layer 0's q norm (4 heads of 64)
        assert all(p.ref_transform == f"block(16, {p.cand_name.rsplit('.b', 1)[1]})"
                   for p in blocks)
        assert not [c for c in result.cand_only if ".b" in c.name]
    if bug is None:
        assert result.verdict == "match", (result.first_divergence, result.coverage)
    else:
        first = result.first_divergence
        assert result.verdict == "diverged"
        assert (first.step, first.ref_name) == (1, "model.layers.0.self_attn.q_norm")
        assert result.diagnosis.kind == "blocked_norm"


@pytest.fixture(scope="module")
def moe_reference(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, list[int]]:
    """A tiny Qwen3-MoE (4 experts, top 2, renormalized; a router with spread-out logits)
    saved as transformers saves it, and transformers' dump of it."""
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    root = tmp_path_factory.mktemp("moe")
    torch.manual_seed(0)
    model = Qwen3MoeForCausalLM(Qwen3MoeConfig(
        vocab_size=320, hidden_size=64, intermediate_size=128, moe_intermediate_size=32,
        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
        num_experts=4, num_experts_per_tok=2, norm_topk_prob=True, max_position_embeddings=64))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("mlp.gate.weight"):
                param.normal_(0, 0.5)
    model.save_pretrained(root / "qwen3moe")
    tokens = capture(f"hf:{root / 'qwen3moe'}", str(root / "ref.lsd"), tokens=PROMPT,
                     decode=DECODE)
    return root / "qwen3moe", root / "ref.lsd", tokens


def test_a_fused_moe_engine_matches_and_its_renormalization_bug_is_measured(
        tmp_path, moe_reference):
    """vLLM's Qwen3-MoE shape: a router returning (logits, None), every expert in one
    FusedMoE module (w13_weight, w2_weight) called with the router's logits, no routing
    recorded. Bug-free it matches transformers and its weights are the checkpoint's. With the
    top-k weights left unnormalized, the experts' output is diagnosed from what both dumps
    hold: the reference's scaled per token by its top-2 probabilities' sum (it was the 'op'
    fallback, naming the router's logits as the experts' input)."""
    model, ref, tokens = moe_reference
    assert lockstep.check_loaded(LLM(model).model, model)
    nano_vllm(model, tmp_path / "good.lsd", tokens)
    result = lockstep.compare(ref, tmp_path / "good.lsd")
    assert result.verdict == "match", (result.first_divergence, result.coverage.gaps)
    nano_vllm(model, tmp_path / "bad.lsd", tokens, bug="moe_no_renormalize")
    result = lockstep.compare(ref, tmp_path / "bad.lsd")
    first, found = result.first_divergence, result.diagnosis
    assert first is not None and (first.step, first.ref_name) == (0, "model.layers.0.mlp.experts")
    assert found is not None and found.kind == "moe", found
    assert found.title.startswith("the experts' output is the reference's times each token's "
                                  "top-2 routing weights' sum")
    assert found.detail["top_k"] == 2 and found.detail["residual"] < 1e-5


def test_a_compiled_model_is_recorded_under_its_own_names(tmp_path, references):
    """torch.compile traces a module's hooks with it: lockstep's hooks failed the engine's
    forward inside Dynamo ('Cannot call numel() on tensor with symbolic sizes'). They run as
    plain Python there (a graph break each), and the compiled model records under the names
    it has uncompiled (no '_orig_mod'), so it pairs with transformers and matches. The
    'eager' backend runs Dynamo, where the failure was, without compiling kernels."""
    model, ref, tokens = references["llama"]
    llm = LLM(model)
    llm.model.model = torch.compile(llm.model.model, backend="eager", dynamic=True)
    with lockstep.record(tmp_path / "cand.lsd", meta=llm.meta) as rec:
        rec.watch(llm.model)
        rec.watch(llm.sampler)
        chosen = llm.generate(PROMPT, DECODE, forced=tokens[:DECODE])
        rec.add_meta(generated_token_ids=chosen)
    with lockstep.open_dump(tmp_path / "cand.lsd") as dump:
        names = {r.name for r in dump.records}
    assert "model.layers.1.self_attn.qkv_proj" in names
    assert not any("_orig_mod" in n for n in names)
    result = lockstep.compare(ref, tmp_path / "cand.lsd")
    assert result.verdict == "match", (result.first_divergence, result.coverage.gaps)
