"""A prefill fed in chunks is joined into one step before comparing (align.chunks): on
dumps written by a small numpy "engine" through lockstep's probes, each rule (concatenated
along the tokens, the last chunk's, left out) and each side (candidate, reference, both cut
at other places), and which chunk a divergence starts in."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np

import lockstep
from lockstep.align.chunks import join_chunks
from lockstep.store.reader import open_dump

IDS = [5, 9, 2, 7, 3, 8, 1, 6, 4]
WIDTH = 6
TABLE = np.random.default_rng(0).standard_normal((16, WIDTH)).astype(np.float32)


def run(out: Path, chunks: Sequence[int], decode: int = 2, bug: str | None = None,
        odd: bool = False, cached: int = 0, square: bool = False, extras: bool = True,
        vm: bool = False) -> None:
    """Feed IDS in chunks of the given sizes, then ``decode`` steps. ``mix`` is each token's
    row averaged with every row before it (a cache of the rows so far); ``keys`` is that
    cache read back (every row so far); ``last`` the last row's mix alone. ``bug``:
    ``own_chunk`` (a chunk mixes its own rows only) or ``positions`` (a later chunk's
    positions from 0). ``cached``: the rows of the first tokens are in the cache before
    the recording (a prefix cache), and ``chunks`` feed the rest. ``square``: a record
    (tokens, tokens) whose token dim cannot be told. ``extras=False``: only the ids,
    positions, ``x`` and ``mix``. ``vm``: a record ``vec`` without a token dim when a step is
    fed one token (as a decode VM writes it)."""
    ids = list(IDS) + [10 + i for i in range(decode)]
    cuts = [cached]
    for n in chunks:
        cuts.append(cuts[-1] + n)
    assert cuts[-1] == len(IDS)
    cuts += [len(IDS) + i + 1 for i in range(decode)]
    cache: list[np.ndarray] = [TABLE[t] + 0.01 * i for i, t in enumerate(IDS[:cached])]
    with lockstep.record(out) as rec:
        for k in range(len(cuts) - 1):
            a, b = cuts[k], cuts[k + 1]
            with rec.step():
                fed = np.array(ids[a:b], dtype=np.int64)
                start = 0 if bug == "positions" and (k or cached) else a
                lockstep.probe("input_ids", fed)
                lockstep.probe("positions", np.arange(start, start + b - a))
                x = TABLE[fed] + 0.01 * np.arange(start, start + b - a)[:, None]
                lockstep.probe("x", x.astype(np.float32))
                if bug == "own_chunk":
                    cache = cache[:0]
                rows = []
                for row in x:
                    cache.append(row)
                    rows.append(np.mean(cache, axis=0))
                mix = np.stack(rows).astype(np.float32)
                lockstep.probe("mix", mix)
                if vm:  # one token's vector when fed one token, else a row each
                    lockstep.probe("vec", mix[0] if len(mix) == 1 else mix)
                if not extras:
                    continue
                lockstep.probe("keys", np.stack(cache).astype(np.float32))
                lockstep.probe("last", mix[-1:])
                if square:
                    lockstep.probe("square", np.zeros((b - a, b - a), np.float32))
                if odd:  # a record no rule can join: one row more than fed
                    lockstep.probe("odd", np.zeros((b - a + 1, 2), np.float32))
                else:
                    lockstep.probe("odd", np.zeros((1, 2), np.float32))


def test_a_candidate_prefill_in_chunks_is_joined_and_compared_over_every_token(tmp_path):
    run(tmp_path / "ref", [9])
    run(tmp_path / "cand", [4, 4, 1])
    result = lockstep.compare(tmp_path / "ref", tmp_path / "cand")
    assert result.verdict == "match", (result.first_divergence, result.coverage)
    (side,) = result.chunks.sides
    assert side.side == "candidate"
    assert [(g.steps, g.sizes) for g in side.groups] == [((0, 1, 2), (4, 4, 1))]
    # ids, positions, x, mix; keys (grown), last, odd
    assert dict(side.rules) == {"concatenated": 4, "stacked": 0, "last chunk": 3}
    by = {(p.step, p.ref_name): p for p in result.results}
    assert by[(0, "mix")].cand_shape == (9, WIDTH)  # every token, not the last chunk's
    assert by[(0, "keys")].cand_shape == (9, WIDTH)  # grown to every token: the last's
    assert by[(0, "last")].cand_shape == (1, WIDTH)
    assert result.step_match.pairs == ((0, 0), (1, 3), (2, 4))
    assert {p.step for p in result.results} == {0, 1, 2}


def test_a_divergence_in_a_later_chunk_names_that_chunk(tmp_path):
    run(tmp_path / "ref", [9])
    run(tmp_path / "cand", [4, 4, 1], bug="own_chunk")
    result = lockstep.compare(tmp_path / "ref", tmp_path / "cand")
    first = result.first_divergence
    assert result.verdict == "diverged" and (first.step, first.ref_name) == (0, "mix")
    assert result.chunks.blamed == (1, 2) and result.chunks.side == "candidate"
    errors = dict(result.chunks.chunk_errors)
    assert errors[0] == 0.0 and errors[1] > 0.1
    assert "chunk 2 of 3 (step 1, tokens 4-7), after 1 chunk that matches" in \
        result.chunks.blame
    assert result.diagnosis.kind == "chunk"
    assert result.diagnosis.detail["chunk"] == 1


def test_positions_fed_from_zero_again_are_shown(tmp_path):
    run(tmp_path / "ref", [9])
    run(tmp_path / "cand", [4, 5], bug="positions")
    result = lockstep.compare(tmp_path / "ref", tmp_path / "cand")
    # joined by the ids fed, though the second chunk's positions start a sequence again
    assert [g.steps for g in result.chunks.sides[0].groups] == [(0, 1)]
    assert result.first_divergence.ref_name == "positions"  # integers: exact
    result_x = next(p for p in result.results if (p.step, p.ref_name) == (0, "x"))
    assert result_x.error > 1e-3
    assert any("chunk 2 (tokens 4-8 of the prefill) positions 0, 1, 2, 3, 4" in e
               for e in result.diagnosis.evidence), result.diagnosis


def test_the_reference_side_and_both_sides_cut_at_other_places(tmp_path):
    run(tmp_path / "whole", [9])
    run(tmp_path / "fours", [4, 4, 1])
    run(tmp_path / "threes", [3, 3, 3])
    result = lockstep.compare(tmp_path / "fours", tmp_path / "whole")
    assert result.verdict == "match"
    assert [(s.side, s.groups[0].steps) for s in result.chunks.sides] == \
        [("reference", (0, 1, 2))]
    assert result.steps == (0, 3, 4)  # the reference's own step numbers
    result = lockstep.compare(tmp_path / "fours", tmp_path / "threes")
    assert result.verdict == "match"
    assert [(s.side, s.groups[0].sizes) for s in result.chunks.sides] == \
        [("reference", (4, 4, 1)), ("candidate", (3, 3, 3))]


def test_steps_fed_alike_on_both_sides_are_not_joined(tmp_path):
    run(tmp_path / "a", [4, 5])
    run(tmp_path / "b", [4, 5])
    result = lockstep.compare(tmp_path / "a", tmp_path / "b")
    assert result.verdict == "match" and result.chunks is None
    with open_dump(tmp_path / "a") as a, open_dump(tmp_path / "b") as b:
        ref, cand, sides = join_chunks(a, b)
        assert ref is a and cand is b and sides == ()


def test_a_record_no_rule_joins_is_listed_and_the_comparison_is_incomplete(tmp_path):
    run(tmp_path / "ref", [9], odd=True)
    run(tmp_path / "cand", [4, 5], odd=True)
    result = lockstep.compare(tmp_path / "ref", tmp_path / "cand")
    assert result.verdict == "incomplete"
    (side,) = result.chunks.sides
    assert [(step, name) for step, name, _ in side.left_out] == [(0, "odd")]
    assert "neither concatenate" in side.left_out[0][2]
    gap = next(g for g in result.coverage.gaps if g.what == "chunks")
    assert gap.records == ("odd@0",)


def test_a_prefill_after_a_cached_prefix_is_compared_from_that_token_on(tmp_path):
    """The candidate's first 5 tokens' rows were cached before the recording (vLLM's prefix
    caching, SGLang's radix cache): its prefill feeds tokens 5-8, at positions 5-8. The
    reference's prefill is compared from token 5 on; before, its 9 rows against the
    candidate's 4 were 'shapes differ', and the comparison incomplete."""
    run(tmp_path / "ref", [9])
    run(tmp_path / "cand", [4], cached=5)
    result = lockstep.compare(tmp_path / "ref", tmp_path / "cand")
    assert result.verdict == "match", (result.first_divergence, result.coverage.gaps)
    (cut,) = result.chunks.cuts
    assert (cut.side, cut.step, cut.start, cut.tokens, cut.how) == ("reference", 0, 5, 9,
                                                                    "positions")
    assert "tokens 0-4 came from its prefix cache" in result.chunks.lines()[0]
    by = {(p.step, p.ref_name): p for p in result.results}
    assert by[(0, "mix")].ref_shape == (4, WIDTH) and by[(0, "mix")].error < 1e-6
    assert by[(0, "keys")].ref_shape == (9, WIDTH)  # the cache read back: whole
    # the other way round: the reference began after its cached prefix
    result = lockstep.compare(tmp_path / "cand", tmp_path / "ref")
    assert result.verdict == "match"
    assert [(c.side, c.start) for c in result.chunks.cuts] == [("candidate", 5)]


def test_a_cached_prefix_then_chunks(tmp_path):
    run(tmp_path / "ref", [9])
    run(tmp_path / "cand", [2, 2], cached=5, bug="own_chunk")
    result = lockstep.compare(tmp_path / "ref", tmp_path / "cand")
    assert [(c.start, c.how) for c in result.chunks.cuts] == [(5, "positions")]
    assert [g.sizes for g in result.chunks.sides[0].groups] == [(2, 2)]
    first = result.first_divergence
    assert (first.step, first.ref_name) == (0, "mix")  # the first chunk forgot the cache
    assert result.chunks.blamed[0] == 0


def test_positions_from_zero_after_a_cached_prefix_are_cut_by_the_ids(tmp_path):
    run(tmp_path / "ref", [9])
    run(tmp_path / "cand", [4], cached=5, bug="positions")
    result = lockstep.compare(tmp_path / "ref", tmp_path / "cand")
    (cut,) = result.chunks.cuts
    assert (cut.start, cut.how) == (5, "ids")
    assert "or were cut off the prompt" in result.chunks.lines()[0]
    assert result.verdict == "diverged"
    assert result.first_divergence.ref_name == "positions"


def test_a_record_whose_token_dim_cannot_be_told_is_not_cut(tmp_path):
    run(tmp_path / "ref", [9], square=True)
    run(tmp_path / "cand", [4], cached=5, square=True)
    result = lockstep.compare(tmp_path / "ref", tmp_path / "cand")
    assert result.verdict == "incomplete"
    (cut,) = result.chunks.cuts
    assert [name for name, _ in cut.left_out] == ["square"]
    assert "which holds the tokens is not known" in cut.left_out[0][1]
    assert any(g.what == "chunks" for g in result.coverage.gaps)


def speculative(out: Path, verify: Sequence[tuple[int, int]], bug: str | None = None,
                last: bool = False) -> None:
    """Prefill IDS, then decode steps that each feed the next token and drafts: ``verify``
    holds (drafts fed, drafts kept); a rejected draft is token 0 (a wrong guess), and its
    position is fed again by the next step. The tokens kept are 10, 11, ... as in ``run``'s
    decode. ``bug``: ``own_chunk`` (a verify step mixes its own rows only). ``last``: also
    each step's last row alone."""
    cache: list[np.ndarray] = []
    with lockstep.record(out, meta={"prompt_token_ids": IDS}) as rec:
        steps = [(list(IDS), 0)]
        nxt = 10
        for drafts, kept in verify:
            fed = [nxt] + [nxt + 1 + j if j < kept else 0 for j in range(drafts)]
            steps.append((fed, kept))
            nxt += 1 + kept
        pos = 0
        for k, (fed_ids, kept) in enumerate(steps):
            with rec.step():
                fed = np.array(fed_ids, dtype=np.int64)
                positions = np.arange(pos, pos + len(fed))
                lockstep.probe("input_ids", fed)
                lockstep.probe("positions", positions)
                x = TABLE[fed] + 0.01 * positions[:, None]
                lockstep.probe("x", x.astype(np.float32))
                base = [] if bug == "own_chunk" and k else cache[:pos]
                rows, seen = [], list(base)
                for row in x:
                    seen.append(row)
                    rows.append(np.mean(seen, axis=0))
                lockstep.probe("mix", np.stack(rows).astype(np.float32))
                if last:
                    lockstep.probe("last", np.stack(rows[-1:]).astype(np.float32))
                cache = cache[:pos] + list(x)
                pos += len(fed) if k == 0 else 1 + kept
        rec.add_meta(generated_token_ids=list(range(10, nxt + 1)))


def test_speculative_decoding_steps_drop_their_rejected_drafts_and_meet_single_steps(tmp_path):
    """Each verify step fed the next token and 2 drafts and kept 1: its rejected draft's row
    is cut off, and the reference's two single-token steps for the same tokens are joined
    to meet it. Before, no verify step matched a reference step: INCOMPLETE."""
    run(tmp_path / "ref", [9], decode=6, extras=False)
    speculative(tmp_path / "cand", [(2, 1), (2, 1), (2, 1)])
    result = lockstep.compare(tmp_path / "ref", tmp_path / "cand")
    assert result.verdict == "match", (result.first_divergence, result.coverage.gaps)
    cuts = result.chunks.drafts
    assert [(c.side, c.step, c.fed, c.kept) for c in cuts] == [
        ("candidate", 1, 3, 2), ("candidate", 2, 3, 2), ("candidate", 3, 3, 2)]
    (side,) = result.chunks.sides
    assert side.side == "reference" and not side.groups[0].prefill
    assert [g.steps for g in side.groups] == [(1, 2), (3, 4), (5, 6)]
    assert result.step_match.pairs == ((0, 0), (1, 1), (3, 2), (5, 3))
    assert result.tokens.off_argmax == ()


def test_a_verify_step_that_forgets_the_cache_diverges_there(tmp_path):
    run(tmp_path / "ref", [9], decode=4, extras=False)
    speculative(tmp_path / "cand", [(2, 1), (2, 1)], bug="own_chunk")
    result = lockstep.compare(tmp_path / "ref", tmp_path / "cand")
    first = result.first_divergence
    assert result.verdict == "diverged" and (first.step, first.ref_name) == (1, "mix")
    assert "starts in the reference's step 1;" in result.chunks.blame


def test_a_verify_steps_last_row_alone_is_left_out_not_compared(tmp_path):
    """A record holding a verify step's last row alone is a rejected draft's: it is left out
    (incomplete), not compared with the reference's row of another token."""
    run(tmp_path / "ref", [9], decode=2, extras=False)
    speculative(tmp_path / "cand", [(2, 1)], last=True)
    result = lockstep.compare(tmp_path / "ref", tmp_path / "cand")
    (cut,) = result.chunks.drafts
    assert [name for name, _ in cut.left_out] == ["last"]
    assert result.verdict == "incomplete"


def test_joined_records_are_not_taken_for_repeats_of_each_other(tmp_path):
    """A joined record has no place in the data file: its stand-in offset is its own, so
    pairing does not set it aside as a repeat of another joined record (every one had
    offset 0, and a structural pass over what was left paired llama.cpp's final norm with a
    fused norm's residual output: a false DIVERGED)."""
    from lockstep.align.pairing import _repeats

    run(tmp_path / "ref", [9])
    run(tmp_path / "cand", [4, 5])
    with open_dump(tmp_path / "ref") as a, open_dump(tmp_path / "cand") as b:
        _, cand, _ = join_chunks(a, b)
        joined = [r for r in cand.records if "chunks" in r.extra]
        assert len(joined) == 4 and all(r.offset < 0 for r in joined)
        assert len({r.offset for r in joined}) == 4
        assert not _repeats(cand)


def test_a_prompt_fed_one_token_per_step_is_stacked_into_one_prefill(tmp_path):
    """A simple engine (a decode VM) feeds the prompt one token per step, and writes each
    token's vector without a token dim: stacked, the 9 steps are the reference's prefill."""
    run(tmp_path / "ref", [9], vm=True)
    run(tmp_path / "cand", [1] * 9, vm=True)
    result = lockstep.compare(tmp_path / "ref", tmp_path / "cand")
    assert result.verdict == "match", (result.first_divergence, result.coverage.gaps)
    (side,) = result.chunks.sides
    assert side.groups[0].sizes == (1,) * 9 and side.groups[0].prefill
    assert dict(side.rules)["stacked"] == 1  # vec: (6,) per step, stacked to (9, 6)
    by = {(p.step, p.ref_name): p for p in result.results}
    assert by[(0, "vec")].cand_shape == (9, WIDTH) and by[(0, "vec")].error < 1e-6
    assert by[(0, "mix")].cand_shape == (9, WIDTH)


def test_lockstep_align_lines_the_steps_up_as_compare_does(tmp_path):
    """``lockstep align`` paired the recorded steps by number: the reference's 9-token prefill
    with the first chunk's 4 tokens, its decode steps with the later chunks, and the
    candidate's decode steps with nothing. It now cuts, joins and matches steps as compare
    does."""
    import json

    from lockstep.cli.main import main

    run(tmp_path / "ref", [9])
    run(tmp_path / "cand", [4, 4, 1])
    assert main(["align", str(tmp_path / "ref"), str(tmp_path / "cand"), "--json",
                 str(tmp_path / "a.json")]) == 0
    report = json.loads((tmp_path / "a.json").read_text())
    assert {p["step"] for p in report["pairs"]} == {0, 1, 2}
    assert report["cand_only"] == []  # the decode steps 3 and 4 were left unpaired
