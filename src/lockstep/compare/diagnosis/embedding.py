"""The ``embedding`` rule: token ids or embeddings differ at prefill."""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from ...align.kinds import Kind as K
from ...textfmt import fmt
from .. import evidence as ev
from ..case import Case, label
from .model import Diagnosis, make, rule

__all__ = ["embedding"]

@rule("embedding")
def embedding(case: Case) -> Diagnosis | None:
    """Token ids or embeddings differ at prefill: positions fed as ids, shifted or offset
    ids, or embeddings that differ while the ids agree."""
    f = case.first
    role = case.role(f)
    if role.op not in (K.INPUT_IDS, K.EMBED) or (f.step > 0 and case.prefill_ok):
        return None
    ids = f if role.op == K.INPUT_IDS else case.find((K.INPUT_IDS,), None)
    evidence: list[str] = []
    detail: dict[str, Any] = {}
    id_arrays = case.arrays(ids) if ids is not None and not case.agrees(ids) else None
    if ids is not None and not case.agrees(ids) and id_arrays is None:
        return make("embedding", f"token ids differ at step {f.step} ({label(ids)}: "
                    f"{fmt(ids.error)} of them)", ["the prompt, tokenizer and chat template "
                                                   "on both sides"], evidence)
    if id_arrays is not None:
        ri, ci = id_arrays
        d = ev.describe_ids(ri, ci)
        detail.update(dataclasses.asdict(d),
                      reference_ids=ri.reshape(-1)[:16].astype(int).tolist(),
                      candidate_ids=ci.reshape(-1)[:16].astype(int).tolist())
        evidence.append(f"{d.differ} of {d.numel} token ids differ: reference "
                        f"{detail['reference_ids']}, candidate {detail['candidate_ids']}")
        if d.arange:
            title = (f"the candidate was fed positions as token ids (0..{d.numel - 1}) "
                     f"at step {f.step}")
            checks = ["the argument order of the model's forward: positions and input_ids "
                      "swapped (forward(positions, input_ids))",
                      "the batch built for prefill: input_ids are the prompt's tokens, "
                      "positions 0..T-1"]
        elif d.shift:
            title = (f"the candidate's token ids are shifted by {d.shift:+d} position "
                     "(a BOS token missing or added)")
            checks = ["BOS/special tokens: add_special_tokens, the chat template"]
        elif d.offset is not None:
            title = f"the candidate's token ids are the reference's {d.offset:+d}"
            checks = ["the tokenizer and vocabulary: the same tokenizer.json, added tokens"]
        else:
            title = f"token ids differ at step {f.step}: {d.differ} of {d.numel}"
            checks = ["the prompt and tokenizer: the same text, tokenizer.json and chat "
                      "template on both sides"]
        checks.append("the token ids' dtype (int32 vs int64) and that they reach the model")
        return make("embedding", title, checks, evidence, **detail)
    arrays = case.arrays(f)
    if ids is not None:
        evidence.append(f"the token ids agree ({label(ids)}); the embeddings do not "
                        f"(relative L2 {fmt(f.error)})")
    if arrays is not None and ev.squeeze(arrays[0]).ndim == 2:
        errs = ev.index_errors(*arrays, axis=0)
        bad = np.flatnonzero(errs > case.good())
        evidence.append(f"{bad.size} of {errs.size} positions' embeddings differ (first: "
                        f"{', '.join(map(str, bad[:8].tolist()))})")
        detail["positions_differing"] = bad[:16].tolist()
    s = case.scale_of(arrays)
    if s is not None:
        evidence.append(f"the candidate's embeddings are {fmt(s)} x the reference's")
        detail["scale"] = s
    checks = ["the embedding weights (embed_tokens / token_embd): loaded, the right tensor "
              "and dtype, dequantized correctly (`lockstep weights`)",
              "the lookup: row = token id in a [vocab, hidden] table (not transposed)",
              "an embedding scale (x sqrt(hidden_size) in some models)"]
    if ids is None:
        checks.insert(0, "the token ids fed (not captured here: record input_ids)")
    return make("embedding", f"the embeddings differ at step {f.step}"
                + (" while the token ids agree" if ids is not None else ""), checks, evidence,
                **detail)
