"""How long pairing two 30-layer, 5-step recordings takes.

Writes two dumps shaped like a 30-layer SmolLM2 (hidden 576, 9 heads of 64, 3 KV heads,
MLP 1536; a 16-token prefill then 4 decode steps, 17 tensors per layer): the reference with
transformers' names, the candidate once with the Llama reference code's names (paired
through the name tables) and once with names no table knows (``trunk.N.sa.qp``: paired by
structural auto-alignment, which reads a few tensors to check values). The candidate's values
are the reference's plus 1e-3 relative noise, with a bug (a 2x scale) from layer 1 on, so
values stop agreeing there as they would in a real divergence.

    python benchmarks/align_speed.py

Target: under a second for each alignment.
"""

from __future__ import annotations

import tempfile
import time
from collections import Counter
from pathlib import Path

import numpy as np

import lockstep
from lockstep.align.pairing import align

LAYERS, STEPS, PREFILL = 30, 5, 16
HIDDEN, HEADS, KV, HEAD_DIM, MLP = 576, 9, 3, 64, 1536
# (transformers name, Llama reference name, a name no table knows, width)
OPS = [
    ("input_layernorm", "attention_norm", "pre", HIDDEN),
    ("self_attn.q_proj", "attention.wq", "sa.qp", HEADS * HEAD_DIM),
    ("self_attn.k_proj", "attention.wk", "sa.kp", KV * HEAD_DIM),
    ("self_attn.v_proj", "attention.wv", "sa.vp", KV * HEAD_DIM),
    ("self_attn.o_proj:input.0", "attention.wo:input.0", "sa.mix", HIDDEN),
    ("self_attn.o_proj", "attention.wo", "sa.op", HIDDEN),
    ("self_attn", "attention", "sa", HIDDEN),
    ("post_attention_layernorm:input.0", "ffn_norm:input.0", "res1", HIDDEN),
    ("post_attention_layernorm", "ffn_norm", "pre2", HIDDEN),
    ("mlp.gate_proj", "feed_forward.w1", "ff.g", MLP),
    ("mlp.up_proj", "feed_forward.w3", "ff.u", MLP),
    ("mlp.down_proj:input.0", "feed_forward.w2:input.0", "ff.act", MLP),
    ("mlp.down_proj", "feed_forward.w2", "ff.d", HIDDEN),
    ("mlp", "feed_forward", "ff", HIDDEN),
    ("", "", "", HIDDEN),
]


def _write(path: Path, style: int, seed: int, bug: bool) -> int:
    rng = np.random.default_rng(0)
    noise = np.random.default_rng(seed)
    prefix = ("model.layers.{}", "layers.{}", "trunk.{}")[style]
    count = 0
    with lockstep.record(path, meta={"engine": "bench"}, overwrite=True) as rec:
        for step in range(STEPS):
            if step:
                rec.next_step()
            tokens = PREFILL if step == 0 else 1
            for layer in range(LAYERS):
                for op in OPS:
                    base, _, suffix = op[style].partition(":")
                    name = prefix.format(layer) + (f".{base}" if base else "")
                    name += f":{suffix}" if suffix else ""
                    x = rng.standard_normal((1, tokens, op[3]), dtype=np.float32)
                    if seed:
                        x = x + 1e-3 * noise.standard_normal(x.shape, dtype=np.float32)
                        if bug and layer >= 1:
                            x = 2 * x
                    rec.capture(name, x)
                    count += 1
    return count


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        n = _write(root / "ref.lsd", 0, 0, False)
        _write(root / "llama_ref.lsd", 1, 1, True)
        _write(root / "unknown.lsd", 2, 2, True)
        print(f"{n} records per dump ({LAYERS} layers x {len(OPS)} tensors x {STEPS} steps)")
        for label, cand, tables in (("name tables (Llama reference names)", "llama_ref", True),
                                    ("structural (names no table knows)", "unknown", True),
                                    ("structural, tables off", "llama_ref", False)):
            with lockstep.open_dump(root / "ref.lsd") as r, \
                    lockstep.open_dump(root / f"{cand}.lsd") as c:
                t0 = time.perf_counter()
                result = align(r, c, use_tables=tables)
                dt = time.perf_counter() - t0
                right = sum(_same_op(p.ref.name, p.cand.name) for p in result.pairs)
                passes = Counter(p.how for p in result.pairs)
                print(f"{label:40s} {dt * 1000:7.1f} ms  {len(result.pairs)} pairs, "
                      f"{right} correct, {len(result.ref_only)} reference and "
                      f"{len(result.cand_only)} candidate records unpaired; paired by "
                      f"{dict(passes)}")


def _same_op(ref_name: str, cand_name: str) -> bool:
    """Whether two names stand for the same op of the same layer in OPS."""
    def key(name: str) -> tuple[str, int] | None:
        for style, prefix in ((0, "model.layers."), (1, "layers."), (2, "trunk.")):
            if name.startswith(prefix):
                layer, _, rest = name[len(prefix):].partition(".")
                rest = rest or ""
                if ":" in layer:
                    layer, _, suffix = layer.partition(":")
                    rest = f":{suffix}"
                for i, op in enumerate(OPS):
                    base, _, suffix = op[style].partition(":")
                    if rest == base + (f":{suffix}" if suffix else ""):
                        return OPS[i][0], int(layer)
        return None
    k = key(ref_name)
    return k is not None and k == key(cand_name)


if __name__ == "__main__":
    main()
