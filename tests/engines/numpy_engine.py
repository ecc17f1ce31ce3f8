"""A Llama forward in numpy that writes its dump the way a C engine would.

No torch runs: the weights are read from the model directory's safetensors as numpy arrays,
every op is numpy, and each intermediate tensor is appended to a dump with lockstep's
``DumpWriter`` (docs/format.md) under the engine's own names (``emb``, ``l0.q``,
``l0.attn``, ..., ``logits``) with the step it belongs to: 0 for the prefill, then one per
decoded token. Activations are flat ``(tokens, features)``; the logits are every position's.
With ``heads_first``, each layer also records the attention output per head the way its
kernel holds it: ``(heads, tokens, head_dim)`` at prefill, ``(heads, head_dim)`` at decode.

Bugs (``bug=``): ``transposed_lm_head`` reads the row-major ``[vocab, hidden]`` lm_head as
if it were ``[hidden, vocab]`` (a GEMM transpose flag left off); ``rope_base`` reads only the
old top-level ``rope_theta`` of config.json, so it runs RoPE at base 10000 (the mistake this
engine first had); ``gelu`` gates the MLP with GELU (tanh) where Llama's is SiLU;
``scale_by_dim`` scales the attention scores by 1/head_dim instead of 1/sqrt(head_dim).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

import numpy as np
from safetensors.numpy import load_file

from lockstep.store.writer import DumpWriter

BUGS = ("transposed_lm_head", "rope_base", "gelu", "scale_by_dim")


def _rms(x: np.ndarray, weight: np.ndarray, eps: float) -> np.ndarray:
    return x / np.sqrt((x * x).mean(-1, keepdims=True) + eps) * weight


def _silu(x: np.ndarray) -> np.ndarray:
    return x / (1.0 + np.exp(-x))


def _gelu_tanh(x: np.ndarray) -> np.ndarray:
    return 0.5 * x * (1.0 + np.tanh(0.7978845608028654 * (x + 0.044715 * x ** 3)))


def _softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


class NumpyLlama:
    def __init__(self, directory: str | Path, *, bug: str | None = None,
                 heads_first: bool = False) -> None:
        if bug is not None and bug not in BUGS:
            raise ValueError(f"unknown bug {bug!r}; one of {BUGS}")
        directory = Path(directory)
        cfg = json.loads((directory / "config.json").read_text())
        self.w = {k: v.astype(np.float32) for k, v in
                  load_file(str(directory / "model.safetensors")).items()}
        self.bug = bug
        self.heads_first = heads_first
        self.layers = cfg["num_hidden_layers"]
        self.h, self.kv = cfg["num_attention_heads"], cfg["num_key_value_heads"]
        self.d = cfg.get("head_dim") or cfg["hidden_size"] // self.h
        self.eps = cfg.get("rms_norm_eps", 1e-6)
        theta = cfg.get("rope_theta", 10000.0)
        if bug != "rope_base":  # transformers 5 keeps it under rope_parameters
            theta = (cfg.get("rope_parameters") or {}).get("rope_theta", theta)
        self.inv_freq = 1.0 / theta ** (np.arange(0, self.d, 2, dtype=np.float32) / self.d)
        self.lm_head = self.w.get("lm_head.weight", self.w["model.embed_tokens.weight"])
        self.k_cache: list[list[np.ndarray]] = [[] for _ in range(self.layers)]
        self.v_cache: list[list[np.ndarray]] = [[] for _ in range(self.layers)]
        self.out: DumpWriter | None = None
        self.step = 0

    def _put(self, name: str, x: np.ndarray) -> np.ndarray:
        """Append one tensor to the dump, as a C engine's ``fwrite`` would."""
        assert self.out is not None
        x = np.ascontiguousarray(x)
        self.out.write(name, self.step, str(x.dtype), x.shape, memoryview(x).cast("B"),
                       role="probe")
        return x

    def _rope(self, x: np.ndarray, pos: np.ndarray) -> np.ndarray:
        f = pos.astype(np.float32)[:, None] * self.inv_freq[None]
        cos, sin = np.cos(f)[:, None], np.sin(f)[:, None]
        half = self.d // 2
        a, b = x[..., :half], x[..., half:]
        return np.concatenate((a * cos - b * sin, b * cos + a * sin), -1)

    def _layer(self, i: int, x: np.ndarray, pos: np.ndarray) -> np.ndarray:
        w = {k.split(f"model.layers.{i}.", 1)[1]: v for k, v in self.w.items()
             if k.startswith(f"model.layers.{i}.")}
        t, n = f"l{i}", len(pos)
        h = self._put(f"{t}.norm1", _rms(x, w["input_layernorm.weight"], self.eps))
        q = self._put(f"{t}.q", h @ w["self_attn.q_proj.weight"].T)
        k = self._put(f"{t}.k", h @ w["self_attn.k_proj.weight"].T)
        v = self._put(f"{t}.v", h @ w["self_attn.v_proj.weight"].T)
        q = self._put(f"{t}.q_rot", self._rope(q.reshape(n, self.h, self.d), pos))
        k = self._put(f"{t}.k_rot", self._rope(k.reshape(n, self.kv, self.d), pos))
        self.k_cache[i].append(k)
        self.v_cache[i].append(v.reshape(n, self.kv, self.d))
        keys = np.concatenate(self.k_cache[i]).repeat(self.h // self.kv, 1)  # (S, H, D)
        values = np.concatenate(self.v_cache[i]).repeat(self.h // self.kv, 1)
        # scale_by_dim: 1/head_dim where attention scales by 1/sqrt(head_dim)
        scale = 1.0 / self.d if self.bug == "scale_by_dim" else 1.0 / np.sqrt(self.d)
        scores = np.einsum("thd,shd->hts", q, keys) * scale
        total = keys.shape[0]
        future = np.arange(total)[None, :] > (total - n + np.arange(n))[:, None]
        scores = np.where(future[None], -np.inf, scores)
        o = np.einsum("hts,shd->thd", _softmax(scores), values).astype(np.float32)
        if self.heads_first:  # the kernel's own layout: (heads, tokens, dim), (heads, dim)
            self._put(f"{t}.attn_heads", o.transpose(1, 0, 2) if n > 1 else o[0])
        o = self._put(f"{t}.attn", o.reshape(n, self.h * self.d))
        x = x + self._put(f"{t}.o", o @ w["self_attn.o_proj.weight"].T)
        h = self._put(f"{t}.norm2", _rms(x, w["post_attention_layernorm.weight"], self.eps))
        gate = self._put(f"{t}.gate", h @ w["mlp.gate_proj.weight"].T)
        up = self._put(f"{t}.up", h @ w["mlp.up_proj.weight"].T)
        gated = _gelu_tanh(gate) if self.bug == "gelu" else _silu(gate)
        act = self._put(f"{t}.act", gated * up)
        down = self._put(f"{t}.down", act @ w["mlp.down_proj.weight"].T)
        return self._put(f"{t}.out", x + down)

    def _forward(self, ids: list[int], start: int) -> int:
        pos = np.arange(start, start + len(ids))
        self._put("tokens", np.asarray(ids, dtype=np.int64))
        x = self._put("emb", self.w["model.embed_tokens.weight"][np.asarray(ids)])
        for i in range(self.layers):
            x = self._layer(i, x, pos)
        x = self._put("norm", _rms(x, self.w["model.norm.weight"], self.eps))
        head = self.lm_head
        if self.bug == "transposed_lm_head":  # the same bytes read as [hidden, vocab]
            weight = head.reshape(head.shape[1], head.shape[0])
        else:
            weight = head.T
        logits = self._put("logits", x @ weight)
        return int(logits[-1].argmax())

    def generate(self, path: str | Path, prompt: Sequence[int], decode: int,
                 forced: Sequence[int] | None = None) -> list[int]:
        """Prefill, then ``decode`` tokens (the ``forced`` ones when given), into a dump."""
        self.out = DumpWriter(path, {"engine": "numpy-llama",
                                     "prompt_token_ids": list(prompt),
                                     "vocab_size": int(self.lm_head.shape[0])})
        try:
            self.step = 0
            chosen = [self._forward(list(prompt), 0)]
            for i in range(decode):
                self.step = i + 1
                fed = forced[i] if forced is not None else chosen[-1]
                chosen.append(self._forward([fed], len(prompt) + i))
                self.out.flush()
            self.out.add_meta(generated_token_ids=chosen)
        finally:
            self.out.close()
        return chosen
