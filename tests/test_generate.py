"""The generation check: metrics, garbage detectors, prompt files, engines end to end, the CLI."""

from __future__ import annotations

import copy
import io
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from rich.console import Console

from lockstep.cli.main import main
from lockstep.errors import UsageError
from lockstep.generation import Prompt, check_generation, load_prompts
from lockstep.generation.garbage import (
    candidate_only,
    constant_output,
    detect,
    empty_output,
    nonfinite_logits,
    repetition_loop,
    static_logits,
    vocab_end,
)
from lockstep.generation.json_out import generation_dict
from lockstep.generation.metrics import (
    MAX_KL,
    KLStats,
    compare_steps,
    kl_divergence,
    log_softmax,
    summarize,
    top2_margin,
    top_k_ids,
    top_k_overlap,
)
from lockstep.generation.render import GenerationReport
from lockstep.generation.result import Settings, analyze_prompt
from models import PROMPT, tiny

# -- metrics ------------------------------------------------------------------------------


def test_kl_of_known_distributions():
    ref = np.log([[0.5, 0.5], [0.25, 0.75]])
    cand = np.log([[0.25, 0.75], [0.25, 0.75]])
    kl = kl_divergence(ref, cand)
    assert kl[0] == pytest.approx(0.5 * math.log(2.0) + 0.5 * math.log(2.0 / 3.0), rel=1e-12)
    assert kl[1] == 0.0
    # shifting logits changes nothing; a token the candidate rules out costs infinity
    assert kl_divergence(ref + 7.0, cand - 3.0)[0] == pytest.approx(kl[0], rel=1e-12)
    assert kl_divergence([[0.0, 0.0]], [[0.0, -np.inf]])[0] == math.inf
    assert math.isnan(kl_divergence([[0.0, 0.0]], [[np.nan, 0.0]])[0])
    np.testing.assert_allclose(np.exp(log_softmax([1.0, 2.0, 3.0])).sum(), 1.0, rtol=1e-15)


def test_margin_top_k_and_overlap():
    logits = np.array([[1.0, 3.0, 2.5, -1.0], [0.0, 0.0, 0.0, 5.0]])
    assert top2_margin(logits).tolist() == [0.5, 5.0]
    assert top_k_ids(logits, 3).tolist() == [[1, 2, 0], [3, 0, 1]]  # ties: the lower id first
    assert top_k_overlap(np.array([[1, 2, 0]]), np.array([[2, 5, 1]])).tolist() == [2 / 3]


def test_near_tie_is_told_from_a_real_split():
    ref = np.array([[2.0, 1.8, 0.0], [5.0, 0.0, 0.0], [0.0, 3.0, 1.0]])
    cand = np.array([[1.8, 2.0, 0.0], [0.0, 5.0, 0.0], [0.0, 3.1, 1.0]])
    steps = compare_steps(ref, cand, top_k=2, near_tie=1.0)
    assert [s.kind for s in steps] == ["near_tie", "split", "same"]
    tie, split, same = steps
    assert (tie.ref_token, tie.cand_token) == (0, 1)
    assert tie.ref_gap == pytest.approx(0.2) and tie.cand_gap == pytest.approx(0.2)
    assert tie.ref_margin == pytest.approx(0.2) and tie.close
    assert split.ref_gap == pytest.approx(5.0) and split.cand_gap == pytest.approx(5.0)
    assert split.ref_in_cand_top_k and split.cand_in_ref_top_k  # top-2 of 3: still "close"
    assert same.ref_gap == 0.0 and same.cand_gap == 0.0
    # a tighter threshold turns the near-tie into a split
    assert [s.kind for s in compare_steps(ref, cand, near_tie=0.1)] == ["split", "split", "same"]
    summary = summarize(steps)
    assert (summary.steps, summary.same_top, summary.near_ties, summary.splits) == (3, 1, 1, 1)
    assert summary.first_split == 1 and summary.same_top_rate == pytest.approx(1 / 3)
    assert summary.off_argmax == 0


def test_a_token_below_its_own_top_is_a_split_not_a_near_tie():
    # identical logits, but the candidate's sampler picked its second-best token
    logits = np.array([[2.0, 1.9, 0.0]])
    (step,) = compare_steps(logits, logits, ref_tokens=[0], cand_tokens=[1])
    assert step.kind == "split" and step.off_argmax and step.kl == 0.0
    assert step.cand_gap == pytest.approx(-0.1) and summarize([step]).off_argmax == 1
    summary = summarize([step])
    assert step.same_argmax and (summary.same_top, summary.same_argmax) == (0, 1)


def test_vocabularies_of_different_widths_compare_over_the_wider():
    steps = compare_steps(np.array([[0.0, 1.0]]), np.array([[0.0, 1.0, -np.inf, -np.inf]]))
    assert steps[0].kind == "same" and steps[0].kl == 0.0


def test_kl_statistics():
    stats = KLStats.of(list(range(100)) + [math.nan])
    assert (stats.count, stats.nonfinite, stats.mean, stats.median, stats.max) == \
        (100, 1, 49.5, 49.5, 99.0)
    assert stats.p99 == pytest.approx(98.01)


def test_a_distribution_off_with_the_same_top_tokens_is_over_the_kl_limit():
    ref = np.array([[3.0, 1.0, 0.0, -1.0]] * 4)
    tokens = [0, 0, 0, 0]

    def check(cand: np.ndarray):
        return analyze_prompt(0, Prompt(tokens=(1,)), [1], ref_tokens=tokens, ref_logits=ref,
                              cand_tokens=tokens, cand_logits=cand, forced_tokens=tokens,
                              forced_logits=cand, settings=Settings(4, max_kl=MAX_KL))

    assert check(ref + 1e-3).ok
    flat = ref.copy()
    flat[2:] *= 0.25  # the same top token, a much flatter distribution from step 2
    p = check(flat)
    assert p.summary.same_top == 4 and p.split_step is None
    assert p.summary.kl.mean > MAX_KL and p.kl_step == 2 and p.diverged_step == 2 and not p.ok


# -- garbage detectors ---------------------------------------------------------------------


def _normal_logits(steps: int = 6, vocab: int = 50) -> np.ndarray:
    return np.random.default_rng(0).normal(size=(steps, vocab))


def test_nonfinite_logits():
    x = _normal_logits()
    assert nonfinite_logits(x) is None
    x[3, 7] = np.nan
    x[4, :] = -np.inf  # a whole row masked away is garbage too
    flag = nonfinite_logits(x)
    assert flag is not None and flag.step == 3 and "2 of 6 steps" in flag.detail
    x = _normal_logits()
    x[:, 0] = -np.inf  # one masked token is fine
    assert nonfinite_logits(x) is None


def test_repetition_loop():
    assert repetition_loop([5, 6, 1, 2, 1, 2, 1, 2]).step == 2
    assert "repeat [1, 2] 3 times" in repetition_loop([5, 6, 1, 2, 1, 2, 1, 2]).detail
    assert repetition_loop([1, 2, 3, 4, 5, 6, 7, 8]) is None
    assert repetition_loop([1, 2, 3, 4, 5, 6, 9, 9]) is None  # too short a tail to call a loop


def test_vocab_end():
    flag = vocab_end([990, 995, 999, 5], 1000)
    assert flag is not None and flag.step == 0 and "3 of 4 tokens are ids >= 970" in flag.detail
    assert vocab_end([10, 500, 990, 20], 1000) is None


def test_static_logits():
    x = np.tile(_normal_logits(1), (5, 1))
    assert static_logits(x).step == 1
    assert static_logits(_normal_logits()) is None
    assert static_logits(np.zeros((3, 10))) is not None  # all-zero logits never move


def test_empty_and_constant_output():
    assert empty_output([], None).detail == "no tokens generated"
    assert empty_output([2, 2], " \n") is not None
    assert empty_output([7, 8], "hello") is None
    assert empty_output([7, 8], None) is None
    assert constant_output([7, 7, 7, 7]).detail == "all 4 tokens are 7"
    assert constant_output([7, 7, 8]) is None


def test_detect_and_what_the_reference_shares():
    rows = _normal_logits(8)
    assert detect([3, 9, 4, 12, 8, 1, 30, 22], [rows], text="fine") == ()
    cand = detect([7, 7, 7, 7], [rows[:4]])
    assert [f.kind for f in cand] == ["constant"]
    ref = detect([1, 2, 1, 2, 1, 2], [rows[:6]])
    assert [f.kind for f in ref] == ["repetition"]
    assert candidate_only(cand, ref) == ()  # the model loops on both sides: not the engine
    assert candidate_only(cand, ()) == cand


# -- prompt files --------------------------------------------------------------------------


def test_prompt_files(tmp_path):
    txt = tmp_path / "p.txt"
    txt.write_text("first prompt\n\n  second one\n")
    assert [p.text for p in load_prompts(txt)] == ["first prompt", "  second one"]
    assert load_prompts(txt, chat=True)[0].chat_messages() == [
        {"role": "user", "content": "first prompt"}]
    jl = tmp_path / "p.jsonl"
    jl.write_text('{"prompt": "hi"}\n{"messages": [{"role": "user", "content": "yo"}]}\n'
                  '{"tokens": [1, 2]}\n')
    a, b, c = load_prompts(jl)
    assert a.text == "hi" and b.chat_messages() == [{"role": "user", "content": "yo"}]
    assert c.tokens == (1, 2) and c.label == "tokens 1,2"


@pytest.mark.parametrize("name, content, message", [
    ("missing.txt", None, "does not exist"),
    ("empty.txt", "\n  \n", "has no prompts"),
    ("bad.jsonl", '{"prompt": "ok"}\n{"prompt": \n', "line 2: not valid JSON"),
    ("keys.jsonl", '{"text": "x"}\n', "line 1: expected"),
    ("msgs.jsonl", '{"messages": [{"role": "user"}]}\n', "line 1: each message needs"),
])
def test_bad_prompt_files(tmp_path, name, content, message):
    path = tmp_path / name
    if content is not None:
        path.write_text(content)
    with pytest.raises(UsageError, match=message):
        load_prompts(path)


# -- end to end on tiny transformers models ------------------------------------------------


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> Path:
    """good (logits spread by scaling lm_head), bad (layer 1's down_proj x3), garbage (lm_head
    read from its transposed buffer as bfloat16, as a wrong layout and dtype would)."""
    root = tmp_path_factory.mktemp("gen-models")
    good = tiny("llama")
    with torch.no_grad():
        good.lm_head.weight.mul_(30.0)  # random init gives near-uniform logits: all near-ties
    good.save_pretrained(root / "good")
    bad = copy.deepcopy(good)
    with torch.no_grad():
        bad.model.layers[1].mlp.down_proj.weight.mul_(3.0)
    bad.save_pretrained(root / "bad")
    garbage = copy.deepcopy(good)
    with torch.no_grad():
        w = garbage.lm_head.weight
        buf = w.t().contiguous().view(torch.bfloat16).reshape(-1)[: w.numel()]
        w.copy_(buf.float().reshape(w.shape))
    garbage.save_pretrained(root / "garbage")
    return root


TOKENS = [Prompt(tokens=tuple(PROMPT)), Prompt(tokens=(1, 2, 3, 4))]


def test_identical_engines_agree_exactly(models, tmp_path):
    spec = f"hf:{models / 'good'}"
    result = check_generation(spec, spec, TOKENS, max_new_tokens=6, out=tmp_path,
                              ref_options={"dtype": "float64"},
                              cand_options={"dtype": "float64"})
    assert result
    for p in result.prompts:
        assert p.free.split is None and p.free.ref_tokens == p.free.cand_tokens
        assert p.summary.same_top == 6 and p.summary.kl.max == 0.0
        assert p.candidate_flags == () and p.localization is None
    assert result.summary.same_top_rate == 1.0
    assert result.timing.engine_s > 0 and result.timing.total_s >= result.timing.engine_s


def test_a_changed_weight_is_a_real_split_localized(models, tmp_path):
    result = check_generation(f"hf:{models / 'good'}", f"hf:{models / 'bad'}", TOKENS[:1],
                              max_new_tokens=6, out=tmp_path)
    assert not result
    (p,) = result.prompts
    assert p.split_step is not None and p.summary.splits >= 1 and p.garbage == ()
    assert p.kl_step is not None  # the distributions part too, before the tokens do
    assert p.localization is not None and p.localization.step == p.diverged_step
    c = p.comparison
    assert c is not None and c.verdict == "diverged"
    assert c.first_divergence.ref_name == "model.layers.1.mlp.down_proj"
    assert c.first_divergence.step == 0
    assert (tmp_path / "prompt-1" / "candidate.lsd").is_dir()
    doc = generation_dict(result)
    loc = doc["prompts"][0]["localization"]
    assert loc["verdict"] == "diverged"
    assert loc["first_divergence"]["reference"] == "model.layers.1.mlp.down_proj"
    out = Console(width=120, record=True, file=io.StringIO())
    out.print(GenerationReport(result))
    text = out.export_text()
    assert "FAIL" in text and "DIVERGED" in text and "model.layers.1.mlp.down_proj" in text


def test_a_misread_lm_head_is_garbage(models, tmp_path):
    result = check_generation(f"hf:{models / 'good'}", f"hf:{models / 'garbage'}", TOKENS,
                              max_new_tokens=6, localize=False, out=tmp_path)
    assert not result
    for p in result.prompts:
        kinds = {f.kind for f in p.garbage}
        assert "nonfinite" in kinds and "constant" in kinds, p.garbage
        assert p.reference_flags == ()
    assert result.summary.kl.nonfinite == 12


# -- the command line ----------------------------------------------------------------------


def test_cli_pass_and_json(models, tmp_path, capsys):
    spec = f"hf:{models / 'good'}"
    code = main(["generate", spec, spec, "--cand-dtype", "float64", "--tokens", "3,17,42,7",
                 "--max-new-tokens", "4", "--json", str(tmp_path / "g.json"),
                 "--out", str(tmp_path / "out")])
    assert code == 0, capsys.readouterr().err
    doc = json.loads((tmp_path / "g.json").read_text())
    assert doc["kind"] == "generate" and doc["ok"] is True
    assert doc["settings"] == {"max_new_tokens": 4, "top_k": 5, "near_tie": 1.0,
                               "max_kl": 0.05}
    (p,) = doc["prompts"]
    assert p["tokens"] == [3, 17, 42, 7] and p["free_running"]["split_step"] is None
    assert p["teacher_forced"]["same_top"] == 4 and len(p["teacher_forced"]["steps_detail"]) == 4
    assert "PASS" in capsys.readouterr().out


def test_cli_real_split_exits_1(models, tmp_path, capsys):
    code = main(["generate", f"hf:{models / 'good'}", f"hf:{models / 'bad'}", "--tokens",
                 ",".join(map(str, PROMPT)), "--max-new-tokens", "6", "--no-localize",
                 "--json", str(tmp_path / "g.json")])
    assert code == 1
    doc = json.loads((tmp_path / "g.json").read_text())
    assert doc["ok"] is False and doc["prompts"][0]["localization"] is None
    assert doc["summary"]["prompts_split"] == 1


@pytest.mark.parametrize("content, extra, message", [
    (None, [], "does not exist"),
    ("", [], "has no prompts"),
    ('{"prompt": "a"}\nnot json\n', [], "line 2: not valid JSON"),
])
def test_cli_bad_prompts_exit_2(models, tmp_path, capsys, content, extra, message):
    path = tmp_path / ("p.jsonl" if content and "{" in content else "p.txt")
    if content is not None:
        path.write_text(content)
    spec = f"hf:{models / 'good'}"
    assert main(["generate", spec, spec, "--prompts", str(path), *extra]) == 2
    err = capsys.readouterr().err
    assert err.startswith("lockstep: error: ") and message in err and err.count("\n") == 1


def test_cli_usage_errors_exit_2(models, capsys):
    spec = f"hf:{models / 'good'}"
    assert main(["generate", spec, spec, "--tokens", "1,2", "--chat"]) == 2
    assert main(["generate", spec, spec, "--tokens", "1,2", "--max-new-tokens", "0"]) == 2
    # a text prompt on a model saved without a tokenizer
    assert main(["generate", spec, spec, "--prompt", "hello"]) == 2
    assert "no tokenizer" in capsys.readouterr().err


# -- the real model: transformers vs llama.cpp ---------------------------------------------


def test_smollm2_transformers_vs_llamacpp(tmp_path):
    pytest.importorskip("llama_cpp")
    pytest.importorskip("gguf")
    from lockstep.demo import find_smollm2

    gguf = find_smollm2()
    prompts = [Prompt(text="The capital of France is"),
               Prompt(messages=({"role": "user", "content": "Name a color."},))]
    # one thread per engine: on a busy 2-core machine two spinning threads wait on each other
    # (10-50x slower); on an idle one this costs little for 16 tokens
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        result = check_generation(f"hf:{gguf}", f"llamacpp:{gguf}", prompts, max_new_tokens=8,
                                  out=tmp_path, cand_options={"n_threads": 1})
    finally:
        torch.set_num_threads(threads)
    assert result, [(p.split_step, p.garbage) for p in result.prompts]
    assert result.prompts[0].free.ref_text.startswith(" Paris")
    assert result.prompts[1].prompt_ids[:1] == (1,)  # <|im_start|>: the chat template applied
    s = result.summary
    assert s.splits == 0 and s.same_top_rate >= 0.75
    assert 0.0 < s.kl.mean < 0.05 and s.kl.max < 0.2
