"""Running the zoo: every bug against transformers, and where lockstep localized it.

For each model family a tiny random model is built from its transformers config and saved as
a real model directory; transformers records the reference (prefill and three decode steps,
teacher-forced tokens); the zoo engine records the same tokens once per bug, and lockstep
compares the two and diagnoses. Bugs visible only in the chosen tokens are found by greedy
decoding side by side: the logits agree, the tokens do not. Negative controls: the bug-free
zoo in float32, float64 and bfloat16 must not be reported diverged.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import numpy as np

from ..capture.recorder import record
from ..compare import Comparison, compare
from .bugs import BUGS, Bug
from .config import MOE_FAMILIES, ZOO_FAMILIES
from .families import NEW_FAMILIES, tiny_family_model

__all__ = ["ZooResult", "ControlResult", "ZooScore", "run_zoo", "tiny_model"]

PROMPT = [3, 17, 42, 7, 99, 5, 64, 21, 8]
FORCED = [5, 77, 150]  #: decode tokens fed to both sides (not an echo of the prompt's end)
FAMILIES = ZOO_FAMILIES
CONTROLS = ("float32", "float64", "bfloat16")
SHORT_PROMPT = PROMPT[:5]  #: with the decode steps, 8 positions: within every window


def tiny_model(family: str, directory: Path) -> Path:
    """A 2-layer random transformers model of the family, saved once as a model directory.

    Llama: tied lm_head and Llama 3's rope_theta; Qwen3: QK-norm and head_dim 64 (a head is
    four 16-element VM blocks); the new dense families: ``families.tiny_family_model``; the
    MoE families: ``moe.tiny_moe_model``."""
    if family in NEW_FAMILIES:
        return tiny_family_model(family, directory)
    if (directory / "config.json").is_file():
        return directory
    if family in MOE_FAMILIES:
        from .moe import tiny_moe_model

        return tiny_moe_model(family, directory)
    from ..engines.hf import _import

    torch, _ = _import()
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen3Config, Qwen3ForCausalLM

    torch.manual_seed(0)
    config: dict[str, Any] = dict(
        vocab_size=320, hidden_size=128, intermediate_size=176, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    if family == "llama":
        model: Any = LlamaForCausalLM(LlamaConfig(
            **{**config, "rope_theta": 500000.0, "tie_word_embeddings": True}))
    else:
        model = Qwen3ForCausalLM(Qwen3Config(
            **{**config, "rope_theta": 1000000.0, "head_dim": 64}))
    model.save_pretrained(directory)
    return directory


@dataclass(frozen=True)
class ZooResult:
    """One bug on one family: what lockstep said against what was expected."""

    bug: Bug
    family: str
    verdict: str  #: the tensor comparison's verdict ("tokens" bugs: of the token check)
    step: int | None  #: where the first divergence was reported
    tensor: str | None  #: its canonical name ("tokens" for a split in the chosen tokens)
    diagnosis: str | None  #: the diagnosis class given
    title: str | None  #: the diagnosis's one line
    seconds: float
    #: the verdict of the run outside the bug's condition (None: the bug has none)
    outside: str | None = None

    @property
    def localized(self) -> bool:
        return (self.step, self.tensor) == (self.bug.step, self.bug.tensor)

    @property
    def classified(self) -> bool:
        return self.diagnosis == self.bug.diagnosis

    @property
    def ok(self) -> bool:
        return self.localized and self.classified and self.outside != "diverged"


@dataclass(frozen=True)
class ControlResult:
    """The bug-free zoo in one dtype: never diverged."""

    family: str
    dtype: str
    verdict: str

    @property
    def ok(self) -> bool:
        return self.verdict != "diverged"


@dataclass(frozen=True)
class ZooScore:
    results: tuple[ZooResult, ...]
    controls: tuple[ControlResult, ...]
    seconds: float

    @property
    def passed(self) -> int:
        return sum(r.ok for r in self.results)

    def __bool__(self) -> bool:
        return self.passed == len(self.results) and all(c.ok for c in self.controls)


def _zoo_run(path: Path, out: Path, *, bug: str | None = None, dtype: str = "float32",
             prompt: Sequence[int] = PROMPT) -> Any:
    from .engine import ZooEngine

    engine = ZooEngine(f"zoo:{path}", str(path), bug=bug, dtype=dtype)
    engine.load()
    _record(engine, out, prompt)
    return engine


def _record(engine: Any, out: Path, prompt: Sequence[int] = PROMPT) -> Path:
    with record(out, meta={**engine.meta(), "prompt_token_ids": list(prompt)},
                overwrite=True) as rec:
        engine.generate(rec, prompt, len(FORCED), forced=FORCED)
    return out


def _token_split(reference: Any, candidate: Any) -> tuple[int | None, bool]:
    """(first step where the candidate's chosen token differs, whether the two sides' logits
    agree up to there): a split with agreeing logits is the sampler's doing."""
    ref_tokens, ref_logits = reference.decode_logits(PROMPT, len(FORCED) + 1, forced=FORCED)
    tokens, logits = candidate.decode_logits(PROMPT, len(FORCED) + 1, forced=FORCED)
    for step, (a, b) in enumerate(zip(ref_tokens, tokens)):
        if a != b:
            scale = float(np.abs(ref_logits[: step + 1]).max()) or 1.0
            close = float(np.abs(logits[: step + 1] - ref_logits[: step + 1]).max()) / scale
            return step, close < 1e-4
    return None, True


def _localized(comparison: Comparison) -> tuple[int | None, str | None, str | None, str | None]:
    first = comparison.first_divergence
    if first is None:
        return None, None, None, None
    diagnosis = comparison.diagnosis
    return (first.step, first.canonical or first.ref_name,
            diagnosis.kind if diagnosis else None, diagnosis.title if diagnosis else None)


def run_zoo(root: str | Path, *, families: Sequence[str] = FAMILIES,
            bugs: Iterable[str] | None = None, controls: bool = True,
            progress: Callable[[str], Any] = lambda m: None) -> ZooScore:
    """Run every bug (or those named) on every family it applies to; dumps go under root."""
    import torch

    from ..engines.hf import HFEngine

    names = list(bugs) if bugs is not None else list(BUGS)
    root = Path(root)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models: one thread is fastest, and never stalls
    t_all = time.perf_counter()
    results: list[ZooResult] = []
    checks: list[ControlResult] = []
    try:
        for family in families:
            model_dir = tiny_model(family, root / "models" / family)
            reference = HFEngine(f"hf:{model_dir}", str(model_dir))
            reference.load()
            ref_dump = _record(reference, root / family / "reference.lsd")
            short_ref: Path | None = None  # the reference on the short prompt, once needed
            for name in names:
                bug = BUGS[name]
                if family not in bug.families:
                    continue
                progress(f"{family}: {name}")
                t0 = time.perf_counter()
                cand = _zoo_run(model_dir, root / family / f"{name}.lsd", bug=name)
                if bug.tensor == "tokens":
                    step, logits_agree = _token_split(reference, cand)
                    found = (step, "tokens" if step is not None else None,
                             "sampling" if step is not None and logits_agree else None,
                             "the logits agree and the chosen token differs: the sampler"
                             if step is not None and logits_agree else None)
                    verdict = "diverged" if step is not None else "match"
                else:
                    comparison = compare(ref_dump, root / family / f"{name}.lsd")
                    found, verdict = _localized(comparison), comparison.verdict
                outside = None
                if bug.condition is not None:  # outside the condition: must not diverge
                    short_ref = short_ref or _record(reference, root / family / "short.lsd",
                                                     SHORT_PROMPT)
                    short = root / family / f"{name}-short.lsd"
                    _zoo_run(model_dir, short, bug=name, prompt=SHORT_PROMPT)
                    outside = compare(short_ref, short).verdict
                results.append(ZooResult(bug, family, verdict, *found,
                                         seconds=time.perf_counter() - t0, outside=outside))
            for dtype in CONTROLS if controls else ():
                progress(f"{family}: bug-free, {dtype}")
                out = root / family / f"control-{dtype}.lsd"
                _zoo_run(model_dir, out, dtype=dtype)
                checks.append(ControlResult(family, dtype, compare(ref_dump, out).verdict))
    finally:
        torch.set_num_threads(threads)
    return ZooScore(tuple(results), tuple(checks), time.perf_counter() - t_all)
