"""A module-less decode VM for Qwen3, written for lockstep's acceptance tests.

No ``nn.Module`` runs: the weights are plain tensors and every op is a function call, recorded
with ``lockstep.probe`` under the VM's own tag names (``L3.qkv``, ``L3.qn.b5``, ...). The
steps are marked with ``Recorder.next_step``. At decode, QK-norm runs in 16-element blocks,
as a megakernel's thread blocks would, and is recorded only block by block; with
``bug="blocked_qk_norm"`` each block is normalised by its own RMS instead of its head's.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

import lockstep
from engines.nano_vllm import LLM

BLOCK = 16


def _rms(x: Tensor, stats: Tensor, weight: Tensor, eps: float) -> Tensor:
    return x * torch.rsqrt(stats.pow(2).mean(-1, keepdim=True) + eps) * weight


class DecodeVM:
    def __init__(self, directory: str | Path, *, bug: str | None = None) -> None:
        self.llm = LLM(directory)  # only for its loaded weights: its modules never run
        self.bug = bug
        self.w: dict[str, Tensor] = {k: v.detach() for k, v in
                                     self.llm.model.named_parameters()}
        attn = self.llm.model.model.layers[0].self_attn
        self.h, self.kv, self.d = attn.n_heads, attn.n_kv_heads, attn.head_dim
        self.eps = 1e-6
        self.theta = attn.rotary_emb.inv_freq
        self.layers = len(self.llm.model.model.layers)
        self.k_cache: list[list[Tensor]] = [[] for _ in range(self.layers)]
        self.v_cache: list[list[Tensor]] = [[] for _ in range(self.layers)]

    def _rope(self, x: Tensor, pos: Tensor) -> Tensor:
        f = pos.float()[:, None] * self.theta[None]
        cos, sin = f.cos()[:, None], f.sin()[:, None]
        half = self.d // 2
        a, b = x[..., :half], x[..., half:]
        return torch.cat((a * cos - b * sin, b * cos + a * sin), -1)

    def _qk_norm(self, x: Tensor, weight: Tensor, tag: str, decode: bool) -> Tensor:
        if not decode:
            return lockstep.probe(tag, _rms(x, x, weight, self.eps))
        flat = x.reshape(-1)
        out = torch.empty_like(flat)
        for b in range(flat.numel() // BLOCK):
            start = b * BLOCK
            head = slice(start // self.d * self.d, start // self.d * self.d + self.d)
            values, offset = flat[start:start + BLOCK], start % self.d
            stats = values if self.bug == "blocked_qk_norm" else flat[head]
            normed = values * torch.rsqrt(stats.pow(2).mean() + self.eps) \
                * weight[offset:offset + BLOCK]
            out[start:start + BLOCK] = lockstep.probe(f"{tag}.b{b}", normed)
        return out.view_as(x)

    def _layer(self, i: int, x: Tensor, pos: Tensor, decode: bool) -> Tensor:
        w = {k.split(f"model.layers.{i}.", 1)[1]: v for k, v in self.w.items()
             if k.startswith(f"model.layers.{i}.")}
        t = f"L{i}"
        h = lockstep.probe(f"{t}.n1", _rms(x, x, w["input_layernorm.weight"], self.eps))
        qkv = lockstep.probe(f"{t}.qkv", h @ w["self_attn.qkv_proj.weight"].T)
        q, k, v = qkv.split([self.h * self.d, self.kv * self.d, self.kv * self.d], -1)
        q = self._qk_norm(q.view(-1, self.h, self.d), w["self_attn.q_norm.weight"],
                          f"{t}.qn", decode)
        k = self._qk_norm(k.view(-1, self.kv, self.d), w["self_attn.k_norm.weight"],
                          f"{t}.kn", decode)
        q = lockstep.probe(f"{t}.qr", self._rope(q, pos))
        k = lockstep.probe(f"{t}.kr", self._rope(k, pos))
        self.k_cache[i].append(k)
        self.v_cache[i].append(v.view(-1, self.kv, self.d))
        keys = torch.cat(self.k_cache[i]).repeat_interleave(self.h // self.kv, 1)
        values = torch.cat(self.v_cache[i]).repeat_interleave(self.h // self.kv, 1)
        o = F.scaled_dot_product_attention(q.transpose(0, 1), keys.transpose(0, 1),
                                           values.transpose(0, 1), is_causal=not decode)
        o = lockstep.probe(f"{t}.heads", o.transpose(0, 1).reshape(-1, self.h * self.d))
        x = x + lockstep.probe(f"{t}.ao", o @ w["self_attn.o_proj.weight"].T)
        h = lockstep.probe(f"{t}.n2", _rms(x, x, w["post_attention_layernorm.weight"],
                                           self.eps))
        gu = lockstep.probe(f"{t}.gu", h @ w["mlp.gate_up_proj.weight"].T)
        gate, up = gu.chunk(2, -1)
        act = lockstep.probe(f"{t}.swiglu", F.silu(gate) * up)
        down = lockstep.probe(f"{t}.ffn", act @ w["mlp.down_proj.weight"].T)
        return lockstep.probe(f"{t}.out", x + down)

    def _forward(self, ids: list[int], start: int, decode: bool) -> int:
        pos = torch.arange(start, start + len(ids))
        x = self.w["model.embed_tokens.weight"][torch.tensor(ids)]
        x = lockstep.probe("emb", x)
        for i in range(self.layers):
            x = self._layer(i, x, pos, decode)
        x = lockstep.probe("final", _rms(x, x, self.w["model.norm.weight"], self.eps))
        logits = lockstep.probe("logits", x[-1:] @ self.w["lm_head.weight"].T)
        return int(logits[-1].argmax())

    def generate(self, rec: Any, prompt: Sequence[int], decode: int,
                 forced: Sequence[int] | None = None) -> list[int]:
        with torch.no_grad():
            chosen = [self._forward(list(prompt), 0, False)]
            for i in range(decode):
                rec.next_step()
                fed = forced[i] if forced is not None else chosen[-1]
                chosen.append(self._forward([fed], len(prompt) + i, True))
        return chosen
