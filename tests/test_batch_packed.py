"""Packed batches as vLLM runs them: one flat batch per step, decode tokens and joining
prompts back to back, and nothing in the engine's tensors or metadata that says whose token
is whose. lockstep finds it from the ids (and positions) each step was fed and what it asked
the engine to run, splits the batch per sequence and compares each with its solo run.

The engine is tests/engines/nano_vllm.py's ``generate_batch``; the reference is
transformers running each prompt alone."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import lockstep
from engines.nano_vllm import SPEC as NANO_SPEC
from lockstep.batching.infer import REQUEST_KEY
from lockstep.batching.split import layout_of, split_batch
from lockstep.capture.recorder import record
from lockstep.errors import UsageError
from lockstep.workflows.batch import batch_diff
from models import save_tiny

PROMPTS = [[3, 17, 42, 7, 99, 5, 64, 11, 200], [11, 250, 37, 4], [90, 12, 200]]
DECODE = 3

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny("llama", tmp_path_factory.mktemp("packed") / "llama")


def _run(model: Path, out: Path, **options: object):
    """``diff --batch`` of transformers (each prompt alone) against the nano engine (all
    three as one packed batch, the last joining at step 2)."""
    return batch_diff(f"hf:{model}", NANO_SPEC, out, tokens=PROMPTS, decode=DECODE, join_at=2,
                      cand_options={"model": str(model), **options})


def _segments(path: Path) -> list[list[tuple[int, int, int]]]:
    with lockstep.open_dump(path) as dump:
        layout = layout_of(dump)
    return [[(s.sequence, s.start, s.length) for s in st.segments] for st in layout.steps]


@pytest.mark.parametrize("chunk", [0, 4])
def test_a_packed_batch_is_split_by_what_each_step_was_fed(tmp_path, model, chunk):
    result = _run(model, tmp_path, prefill_chunk=chunk)
    assert [c.verdict for c in result.sequences] == ["match"] * 3, \
        [(c.first_divergence, c.coverage) for c in result.sequences]
    steps = _segments(tmp_path / "candidate.lsd")
    if chunk == 0:  # whole prompts; the third joins at step 2 after the others' decode tokens
        assert steps[:3] == [[(0, 0, 9), (1, 9, 4)], [(0, 0, 1), (1, 1, 1)],
                             [(0, 0, 1), (1, 1, 1), (2, 2, 3)]]
    else:  # chunks of 4: the first prompt's last chunk shares a step with the second's decode
        assert steps[:3] == [[(0, 0, 4), (1, 4, 4)], [(0, 0, 4), (1, 4, 1)],
                             [(0, 0, 1), (1, 1, 1), (2, 2, 3)]]
    assert result.join_at == (0, 0, 2) and result.padding is None
    # each sequence's logits row (the lm_head keeps one row per sequence) went to it, and a
    # tensor two modules return stays one tensor in the split dump (pairing reads repeats)
    with lockstep.open_dump(tmp_path / "candidate-1.lsd") as part:
        assert part.get(0, "lm_head").shape == (1, 320)
        assert part.get(0, "model.layers.1:1").offset == \
            part.get(0, "model.layers.1.post_attention_layernorm:1").offset


@pytest.mark.parametrize("chunk", [0, 4])
def test_attention_over_the_whole_flat_batch_is_reproduced(tmp_path, model, chunk):
    """``batch_varlen``: a prompt (or a prompt's first chunk) attends to the step's new keys
    from the batch's first token on. The first sequence of the step matches; the ones packed
    after it diverge at their attention, and attending over the flat batch reproduces their
    output, in the chunk where it happens when the prefill is chunked."""
    result = _run(model, tmp_path, bug="batch_varlen", prefill_chunk=chunk)
    assert [c.verdict for c in result.sequences] == ["match", "diverged", "diverged"]
    for c in result.sequences[1:]:
        f = c.first_divergence
        assert (f.step, f.canonical) == (0, "layers.0.attn_heads"), f
        assert c.diagnosis is not None and c.diagnosis.kind == "batch_mask", c.diagnosis
        assert c.diagnosis.detail["error_flat_mask"] < 1e-5
    # sequence 1 shares its step with sequence 0's prompt (or first chunk), which agrees
    one = result.sequences[1].diagnosis
    assert one.detail["packed_before_error"] < 1e-5
    before = 9 if chunk == 0 else 4  # sequence 0's prompt, or its first chunk
    assert one.detail["packed_after"] == before
    assert f"at batch step 0, its prompt came after {before} tokens of sequences [0]" in \
        one.evidence[0]


def test_logits_taken_from_each_sequences_first_token(tmp_path, model):
    """``batch_last_index``: a prompt's logits come from its first token. The candidate's
    one row is compared with the reference's last, never matched to whichever row its
    values fit, and the diagnosis names the row it came from."""
    result = _run(model, tmp_path, bug="batch_last_index")
    for c, prompt in zip(result.sequences, PROMPTS):
        f = c.first_divergence
        assert c.verdict == "diverged" and (f.step, f.canonical) == (0, "logits"), f
        assert f.ref_transform == f"block(320, {len(prompt) - 1})"
        assert c.diagnosis.kind == "logits"
        assert (c.diagnosis.detail["row"], c.diagnosis.detail["rows"]) == (0, len(prompt))


def test_a_decode_bug_in_a_packed_batch_is_not_blamed_on_the_packing(tmp_path, model):
    """``kv_slot`` with chunked prefill: a sequence's first decode token is packed after
    another's prefill chunk, which agrees; that is no evidence against the packing."""
    result = _run(model, tmp_path, bug="kv_slot", prefill_chunk=4)
    kinds = {c.diagnosis.kind for c in result.sequences if c.diagnosis is not None}
    assert result.diverged == [0, 1, 2] and kinds == {"decode"}, kinds


def test_positions_the_engine_moved_are_kept_as_evidence(tmp_path, model):
    """``decode_position``: the ids still say whose token is whose; each decode segment keeps
    the engine's offset, and the comparison names the rotation."""
    result = _run(model, tmp_path, bug="decode_position")
    assert all((c.first_divergence.step, c.first_divergence.canonical) ==
               (1, "layers.0.q_rope") for c in result.sequences)
    with lockstep.open_dump(tmp_path / "candidate.lsd") as dump:
        layout = layout_of(dump)
    assert [s.moved for s in layout.steps[0].segments] == [(), ()]
    assert [s.moved for s in layout.steps[1].segments] == [(1,), (1,)]


def test_a_prefix_from_the_cache_and_a_graph_padded_batch(tmp_path, model):
    """``prefix_cache=1``: the third prompt shares its first 8 tokens (two KV blocks) with
    the first, so when it joins it computes tokens 8-9 only. ``cuda_graph=1``: a decode-only
    batch of three tokens is padded to four. Both split and match: the third sequence is
    compared from token 8 on, and the padding goes to no sequence."""
    prompts = [PROMPTS[0], PROMPTS[1], PROMPTS[0][:8] + [12, 200]]
    result = batch_diff(f"hf:{model}", NANO_SPEC, tmp_path, tokens=prompts, decode=DECODE,
                        join_at=2, cand_options={"model": str(model), "prefix_cache": 1,
                                                 "cuda_graph": 1})
    assert [c.verdict for c in result.sequences] == ["match"] * 3, \
        [(c.first_divergence, c.coverage) for c in result.sequences]
    with lockstep.open_dump(tmp_path / "candidate.lsd") as dump:
        layout = layout_of(dump)
    third = [(st.step, seg.start, seg.length, seg.position) for st, seg in layout.of(2)]
    assert third[0] == (2, 2, 2, 8)  # tokens 8 and 9, after the two others' decode tokens
    assert [st.width for st in layout.steps[:4]] == [13, 2, 4, 4]
    assert sum(seg.length for seg in layout.steps[3].segments) == 3  # one token of padding
    with lockstep.open_dump(tmp_path / "candidate-2.lsd") as part:
        steps = part.meta["batch_sequence"]["steps"]
    assert (steps[0]["position"], steps[1]["padding_after"]) == (8, 1)
    assert result.notes == (
        "sequence 2's prefill starts at token 8: the tokens before came from the engine's "
        "prefix cache",
        "batch steps [3] hold tokens past their sequences' (a CUDA graph's padding), compared "
        "with none")


def _cli(*args: object) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "lockstep.cli.main", *map(str, args)],
                          capture_output=True, text=True, timeout=300,
                          env={**os.environ, "COLUMNS": "120"})


def test_a_packing_engine_from_the_command_line(tmp_path, model):
    """``diff --batch``; then the batched dump compared whole with one prompt's run is
    refused with what to do, and ``lockstep split`` makes the comparable dumps."""
    out = tmp_path / "out"
    done = _cli("diff", f"hf:{model}", NANO_SPEC, "--batch",
                *[a for p in PROMPTS for a in ("--tokens", ",".join(map(str, p)))],
                "--decode", "2", "--cand-opt", f"model={model}", "--out", out)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "recording 3 prompts as one batch (packed)" in done.stderr + done.stdout
    assert "3 prompts as one batch, packed (whose token is whose found from the ids fed)" \
        in done.stdout
    whole = _cli("compare", out / "reference-0.lsd", out / "candidate.lsd")
    assert whole.returncode == 2
    assert "is one batched run of 3 prompts and the reference is not: split it" in whole.stderr
    split = _cli("split", out / "candidate.lsd", "--out", tmp_path / "split")
    assert split.returncode == 0, split.stderr
    assert "3 sequences, 3 batch steps, packed" in split.stdout
    assert "sequence 1: " in split.stdout and "(4 prompt tokens, 3 steps from batch step 0)" \
        in split.stdout.replace("\n", "")
    again = _cli("split", out / "candidate.lsd", "--out", tmp_path / "split")
    assert again.returncode == 2 and "exists (--overwrite replaces it)" in again.stderr
    one = _cli("compare", out / "reference-1.lsd", tmp_path / "split" / "candidate-1.lsd")
    assert one.returncode == 0, one.stdout


@pytest.mark.parametrize("bug", [None, "chunk_causal"], ids=str)
def test_speculative_decoding_in_a_packed_batch(tmp_path, model, bug):
    """``speculative=2``: each sequence's first decode step feeds its token and two drafts
    in its segment of the flat batch (the next token, kept, then a wrong one) and every row
    of it is sampled. The drafts are found from the positions after the decode token, the
    sequence goes on after the one it kept, and each split dump is a speculative run of one
    sequence: the rejected draft's rows cut, the reference's steps 1 and 2 joined to meet
    the verify step. Before, the first verify step was refused ('token 200 at position 10
    is not the next token of any sequence'). A verify step masked top-left is found there,
    at layer 0's attention, as speculative decoding, for every sequence."""
    result = _run(model, tmp_path, speculative=2, proposer="forced", bug=bug)
    with lockstep.open_dump(tmp_path / "candidate.lsd") as dump:
        layout = layout_of(dump)
    assert [[(s.sequence, s.length, s.drafts, s.rejected) for s in st.segments]
            for st in layout.steps] == [
        [(0, 9, 0, 0), (1, 4, 0, 0)], [(0, 3, 2, 1), (1, 3, 2, 1)],
        [(0, 1, 0, 0), (1, 1, 0, 0), (2, 3, 0, 0)], [(2, 3, 2, 1)], [(2, 1, 0, 0)]]
    assert result.notes == tuple(f"sequence {i} verified speculative drafts at 1 batch "
                                 "steps: 1 of 2 kept" for i in range(3))
    with lockstep.open_dump(tmp_path / "candidate-2.lsd") as part:
        assert part.get(1, "lm_head").shape == (3, 320)  # every row of its verify step
    for c in result.sequences:
        assert [(d.step, d.fed, d.kept) for d in c.chunks.drafts] == [(1, 3, 2)]
        (side,) = c.chunks.sides
        assert side.side == "reference" and [g.steps for g in side.groups] == [(1, 2)]
    if bug is None:
        assert [c.verdict for c in result.sequences] == ["match"] * 3, \
            [(c.first_divergence, c.coverage) for c in result.sequences]
        return
    for c in result.sequences:
        f = c.first_divergence
        assert c.verdict == "diverged" and (f.step, f.canonical) == (
            1, "layers.0.attn_heads"), f
        assert c.diagnosis.kind == "chunk" and c.diagnosis.detail["speculative"]


def test_a_decode_step_masked_top_left_is_named(tmp_path, model):
    """``chunk_causal`` in the flat batch: a decode token sees key 0 alone (SDPA's is_causal
    aligns the mask top-left when queries are fewer than keys). Attention re-enacted from the
    reference's q, k and v with that mask reproduces each sequence's; it was 'the KV cache
    (written slot or read range)'."""
    result = _run(model, tmp_path, bug="chunk_causal")
    for c in result.sequences:
        f = c.first_divergence
        assert c.verdict == "diverged" and (f.step, f.canonical) == (
            1, "layers.0.attn_heads"), f
        assert c.diagnosis.kind == "mask" and c.diagnosis.detail["candidate"] == {
            "top_left": True}, c.diagnosis.title


# -- the inference alone, on dumps written by hand ------------------------------------------
def _packed(path: Path, prompts: list[list[int]], chosen: list[list[int]],
            steps: list[tuple[list[int], list[int]]], declared: dict | None = None) -> Path:
    meta = {REQUEST_KEY: {"prompts": prompts, "join_at": [0] * len(prompts),
                          "generated_token_ids": chosen}}
    if declared is not None:
        meta["batch"] = declared
    with record(path, meta=meta, overwrite=True) as rec:
        for ids, positions in steps:
            with rec.step():
                rec.capture("input_ids", np.array(ids, dtype=np.int64))
                rec.capture("positions", np.array(positions, dtype=np.int64))
                rec.capture("layers.0.out", np.ones((len(ids), 4), dtype=np.float32))
    return path


def test_sequences_sharing_a_prefix_are_told_apart_where_their_tokens_differ(tmp_path):
    """Two prompts with the same first three tokens (a shared system prompt), each fed in
    chunks of 3: the first step cannot tell them apart by ids and need not (either way
    round holds the same tokens); the second step can and does."""
    prompts = [[1, 2, 3, 4, 5], [1, 2, 3, 9]]
    path = _packed(tmp_path / "b.lsd", prompts, [[7, 8], [6, 5]], [
        ([1, 2, 3, 1, 2, 3], [0, 1, 2, 0, 1, 2]),
        ([9, 4, 5], [3, 3, 4]),  # the second's last chunk first: the batch was reordered
        ([7, 6], [5, 4])])
    assert _segments(path) == [[(0, 0, 3), (1, 3, 3)], [(1, 0, 1), (0, 1, 2)],
                               [(0, 0, 1), (1, 1, 1)]]


def test_drafts_are_told_from_the_next_sequences_token_by_what_costs_least(tmp_path):
    """A decode token followed by the other sequence's at the next position reads as two
    decode tokens, not a token and a draft with the other sequence sitting out; a token at
    the next position that is no one's due token at its own position is a draft (the
    cheaper reading than the other sequence fed at a moved position), rejected, and its
    position is fed again."""
    prompts = [[1, 2, 3], [4, 5, 6, 7]]
    path = _packed(tmp_path / "b.lsd", prompts, [[8, 9, 10], [11, 12, 13]], [
        ([1, 2, 3, 4, 5, 6, 7], [0, 1, 2, 0, 1, 2, 3]),
        ([8, 11], [3, 4]),  # sequence 0's token at 3, sequence 1's at 4: no draft
        ([9, 12, 12], [4, 5, 6])])  # 12 at 6 is sequence 0's draft, not sequence 1's
    with lockstep.open_dump(path) as dump:
        layout = layout_of(dump)
    assert [[(s.sequence, s.start, s.length, s.drafts, s.rejected) for s in st.segments]
            for st in layout.steps[1:]] == [[(0, 0, 1, 0, 0), (1, 1, 1, 0, 0)],
                                            [(0, 0, 1, 0, 0), (1, 1, 2, 1, 1)]]


def test_ids_alone_split_a_batch_without_positions(tmp_path):
    prompts = [[1, 2, 3], [4, 5]]
    path = tmp_path / "b.lsd"
    with record(path, meta={REQUEST_KEY: {"prompts": prompts, "join_at": [0, 0],
                                          "generated_token_ids": [[7, 8], [6, 5]]}}) as rec:
        for ids in ([1, 2, 3, 4, 5], [6, 7]):  # the batch reordered: sequence 1 first
            with rec.step():
                rec.capture("input_ids", np.array(ids, dtype=np.int64))
                rec.capture("layers.0.out", np.ones((len(ids), 4), dtype=np.float32))
    assert _segments(path) == [[(0, 0, 3), (1, 3, 2)], [(1, 0, 1), (0, 1, 1)]]


def test_a_token_no_sequence_was_due_is_refused_with_its_place(tmp_path):
    path = _packed(tmp_path / "b.lsd", [[1, 2, 3], [4, 5]], [[7, 8], [6, 5]], [
        ([1, 2, 3, 4, 5], [0, 1, 2, 0, 1]),
        ([7, 99], [3, 2])])  # sequence 1 was to be fed 6: not padding, it is left out
    with pytest.raises(UsageError, match=r"batch step 1: token 99 at position 2 \(flat index "
                                         r"1 of 2\) is not the next token of any sequence "
                                         r"\(due: sequence 1: 6\)"):
        split_batch(path, tmp_path / "split")


def test_a_declared_layout_that_puts_tokens_in_the_wrong_sequence_is_refused(tmp_path):
    """An engine that writes its own layout is checked against what its rows were fed: here
    it names the rows the wrong way round."""
    declared = {"layout": "packed", "prompts": [[1, 2, 3], [4, 5]],
                "steps": [{"rows": [1, 0], "cu_seqlens": [0, 3, 5]}]}
    path = _packed(tmp_path / "b.lsd", [[1, 2, 3], [4, 5]], [[7], [6]],
                   [([1, 2, 3, 4, 5], [0, 1, 2, 0, 1])], declared)
    with pytest.raises(UsageError, match=r"says step 0's row 0 is sequence 1, whose next "
                                         r"tokens are \[4, 5\], but that row was fed"):
        split_batch(path, tmp_path / "split")


def test_a_preempted_sequence_computed_again_is_compared_at_every_step(tmp_path, model):
    """``preempt=2``: at batch step 2 the second sequence loses its KV blocks and at step 3
    is fed all its tokens again as one prefill (vLLM's recompute preemption). Its split dump
    has that step cut to its new token, so every step of it is compared with its solo run's
    (before, the reference's first three steps were joined to meet the recompute step and
    the candidate's first two were left out)."""
    result = _run(model, tmp_path, preempt=2)
    assert [c.verdict for c in result.sequences] == ["match"] * 3
    assert result.notes == ("sequence 1 was fed its tokens again from token 0 at batch step 3 "
                            "(preempted and computed again)",)
    one = result.sequences[1]
    assert one.chunks is not None and [r.as_dict() for r in one.chunks.recomputes] == [
        {"side": "candidate", "step": 2, "fed": 6, "again": 5, "left_out": []}]
    assert sorted({p.step for p in one.results}) == [0, 1, 2, 3]
    assert one.step_match.pairs == ((0, 0), (1, 1), (2, 2), (3, 3))


def _tokens_run(path: Path, steps: list[list[int]]) -> None:
    """A one-sequence run fed ``steps`` (each a list of positions into IDS_RUN), each
    token's row a function of its id and position: any two runs agree where they feed the
    same tokens at the same positions."""
    with record(path, overwrite=True) as rec:
        for positions in steps:
            with rec.step():
                ids = np.array([IDS_RUN[p] for p in positions], dtype=np.int64)
                rec.capture("input_ids", ids)
                rec.capture("positions", np.array(positions, dtype=np.int64))
                x = np.stack([np.full(4, t + 0.1 * p, np.float32)
                              for t, p in zip(ids, positions)])
                rec.capture("x", x)
                rec.capture("heads", np.stack([x, -x], axis=1))  # (tokens, 2 heads, 4)


IDS_RUN = [5, 9, 2, 7, 3, 8]


def test_only_a_step_that_feeds_new_tokens_after_old_ones_is_cut(tmp_path):
    """Recomputed (positions 0-4, then past the last one fed) is cut; a prefill run twice
    (a warm-up: nothing new) is not, and steps fed alike are matched as before."""
    from lockstep.align.regroup import regroup

    _tokens_run(tmp_path / "ref.lsd", [[0, 1, 2], [3], [4], [5]])
    _tokens_run(tmp_path / "again.lsd", [[0, 1, 2], [3], [0, 1, 2, 3, 4], [5]])
    _tokens_run(tmp_path / "warm.lsd", [[0, 1, 2], [0, 1, 2], [3], [4], [5]])
    with lockstep.open_dump(tmp_path / "ref.lsd") as ref:
        for name, cut in (("again.lsd", [(2, 5, 4)]), ("warm.lsd", [])):
            with lockstep.open_dump(tmp_path / name) as cand:
                _, _, regrouped = regroup(ref, cand)
                assert [(r.step, r.fed, r.again) for r in regrouped.recomputes] == cut
    result = lockstep.compare(tmp_path / "ref.lsd", tmp_path / "again.lsd")
    assert result.verdict == "match" and result.step_match.pairs == (
        (0, 0), (1, 1), (2, 2), (3, 3))


def test_a_cut_step_whose_token_dim_one_step_cannot_tell_is_told_by_the_others(tmp_path):
    """Fed again from token 3 in a step of two tokens, the (tokens, 2 heads, 4) record has
    two dims of size 2; the record's other steps (3 tokens, 1 token) say which is the
    tokens', so it is cut and compared, not left out (it was: INCOMPLETE)."""
    _tokens_run(tmp_path / "ref.lsd", [[0, 1, 2], [3], [4], [5]])
    _tokens_run(tmp_path / "again.lsd", [[0, 1, 2], [3], [3, 4], [5]])
    result = lockstep.compare(tmp_path / "ref.lsd", tmp_path / "again.lsd")
    assert result.verdict == "match", result.coverage
    assert [r.as_dict()["left_out"] for r in result.chunks.recomputes] == [[]]
    assert any(p.step == 2 and p.ref_name == "heads" for p in result.results)


def test_a_cover_that_leaves_less_to_padding_wins(tmp_path):
    """Both decode positions moved by one (a position bug), then a token of padding: the
    cover of both sequences (two moved segments) wins over one that leaves the second
    sequence's token to the padding (one moved segment): that refused the step."""
    path = _packed(tmp_path / "b.lsd", [[1, 2, 3], [4, 5]], [[7, 8], [6, 9]], [
        ([1, 2, 3, 4, 5], [0, 1, 2, 0, 1]),
        ([7, 6, 0], [4, 3, 0])])
    assert _segments(path)[1] == [(0, 0, 1), (1, 1, 1)]


def test_a_graph_padded_step_that_a_preempted_sequence_sits_out(tmp_path, model):
    """Four sequences decode; at batch step 2 the fourth is preempted, so three decode
    tokens run padded to four (a captured graph's size) while it waits: the padding is not
    a token fed in its place. It is computed again at step 3 and every sequence matches."""
    prompts = [*PROMPTS, [7, 99, 5, 64, 11]]
    result = batch_diff(f"hf:{model}", NANO_SPEC, tmp_path, tokens=prompts, decode=DECODE,
                        cand_options={"model": str(model), "cuda_graph": 1, "preempt": 2})
    assert [c.verdict for c in result.sequences] == ["match"] * 4
    with lockstep.open_dump(tmp_path / "candidate.lsd") as dump:
        step = layout_of(dump).steps[2]
    assert step.width == 4 and [s.sequence for s in step.segments] == [0, 1, 2]
