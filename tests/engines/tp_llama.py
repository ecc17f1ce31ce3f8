"""A tensor-parallel Llama written for lockstep's tests, run under torch.distributed.

Megatron-style sharding over the ranks of the default process group: q/k/v and gate/up are
column-parallel (each rank holds its heads' rows, its slice of the intermediate size), o_proj
and down_proj row-parallel (each rank's output is a partial sum, all-reduced by the module
around it), the embedding, norms and lm_head replicated. Module names are transformers'
(``model.layers.0.self_attn.q_proj``), so each rank's records pair by name with a dump of
transformers at TP=1. The attention's input to o_proj is probed with a ``shard`` annotation;
every other rule is left to lockstep to detect.

Weights come from a saved transformers Llama directory (``model.safetensors``). One bug, on
rank 1 only: ``shard_offset`` (rank 1 loads rank 0's rows of q_proj: a wrong shard offset).
"""

from __future__ import annotations

import json
import socket
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.distributed as dist
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import Tensor, nn

import lockstep

BUGS = ("shard_offset",)


class RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        var = x.pow(2).mean(-1, keepdim=True)
        return self.weight * (x * torch.rsqrt(var + self.eps))


class Rotary(nn.Module):
    """cos and sin of each position, as transformers' ``rotary_emb`` returns them."""

    def __init__(self, head_dim: int, theta: float) -> None:
        super().__init__()
        self.inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2).float() / head_dim)

    def forward(self, positions: Tensor) -> tuple[Tensor, Tensor]:
        freqs = positions[:, :, None].float() * self.inv_freq[None, None, :]
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos(), emb.sin()


def _rotate(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos[:, None] + rotated * sin[:, None]


def _all_reduce(x: Tensor) -> Tensor:
    out = x.clone()
    dist.all_reduce(out)
    return out


class Attention(nn.Module):
    def __init__(self, cfg: dict[str, Any], world: int, layer: int) -> None:
        super().__init__()
        self.hd = cfg["head_dim"]
        self.heads = cfg["num_attention_heads"] // world
        self.kv_heads = cfg["num_key_value_heads"] // world
        hidden = cfg["hidden_size"]
        self.q_proj = nn.Linear(hidden, self.heads * self.hd, bias=False)  # column-parallel
        self.k_proj = nn.Linear(hidden, self.kv_heads * self.hd, bias=False)
        self.v_proj = nn.Linear(hidden, self.kv_heads * self.hd, bias=False)
        self.o_proj = nn.Linear(self.heads * self.hd, hidden, bias=False)  # row-parallel
        self.name = f"model.layers.{layer}.self_attn"
        self.cache: list[Tensor] = []

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor) -> tuple[Tensor, None]:
        b, t, _ = x.shape
        q = self.q_proj(x).view(b, t, self.heads, self.hd).transpose(1, 2)
        k = self.k_proj(x).view(b, t, self.kv_heads, self.hd).transpose(1, 2)
        v = self.v_proj(x).view(b, t, self.kv_heads, self.hd).transpose(1, 2)
        q, k = lockstep.probe(f"{self.name}.rope", (_rotate(q, cos, sin), _rotate(k, cos, sin)))
        if self.cache:
            k = torch.cat((self.cache[0], k), dim=2)
            v = torch.cat((self.cache[1], v), dim=2)
        self.cache = [k, v]
        rep = self.heads // self.kv_heads
        k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
        out = F.scaled_dot_product_attention(q, k, v, is_causal=t > 1, scale=self.hd ** -0.5)
        out = out.transpose(1, 2).reshape(b, t, self.heads * self.hd)
        lockstep.probe(f"{self.name}.o_proj:input.0", out, shard=("col", -1))
        return _all_reduce(self.o_proj(out)), None  # o_proj records the partial sum


class MLP(nn.Module):
    def __init__(self, cfg: dict[str, Any], world: int) -> None:
        super().__init__()
        hidden, inter = cfg["hidden_size"], cfg["intermediate_size"] // world
        self.gate_proj = nn.Linear(hidden, inter, bias=False)
        self.up_proj = nn.Linear(hidden, inter, bias=False)
        self.down_proj = nn.Linear(inter, hidden, bias=False)
        self.act_fn = nn.SiLU()

    def forward(self, x: Tensor) -> Tensor:
        return _all_reduce(self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x)))


class Layer(nn.Module):
    def __init__(self, cfg: dict[str, Any], world: int, layer: int) -> None:
        super().__init__()
        eps = cfg["rms_norm_eps"]
        self.input_layernorm = RMSNorm(cfg["hidden_size"], eps)
        self.self_attn = Attention(cfg, world, layer)
        self.post_attention_layernorm = RMSNorm(cfg["hidden_size"], eps)
        self.mlp = MLP(cfg, world)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin)[0]
        return x + self.mlp(self.post_attention_layernorm(x))


class Model(nn.Module):
    def __init__(self, cfg: dict[str, Any], world: int) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg["vocab_size"], cfg["hidden_size"])
        self.layers = nn.ModuleList(Layer(cfg, world, i)
                                    for i in range(cfg["num_hidden_layers"]))
        self.norm = RMSNorm(cfg["hidden_size"], cfg["rms_norm_eps"])
        self.rotary_emb = Rotary(cfg["head_dim"], cfg["rope_parameters"]["rope_theta"])

    def forward(self, ids: Tensor, positions: Tensor) -> dict[str, Tensor]:
        x = self.embed_tokens(ids)
        cos, sin = self.rotary_emb(positions)
        for layer in self.layers:
            x = layer(x, cos, sin)
        return {"last_hidden_state": self.norm(x)}


class ForCausalLM(nn.Module):
    def __init__(self, cfg: dict[str, Any], world: int) -> None:
        super().__init__()
        self.model = Model(cfg, world)
        self.lm_head = nn.Linear(cfg["hidden_size"], cfg["vocab_size"], bias=False)

    def forward(self, ids: Tensor, positions: Tensor) -> dict[str, Tensor]:
        return {"logits": self.lm_head(self.model(ids, positions)["last_hidden_state"])}


def _shard(w: Tensor, dim: int, rank: int, world: int) -> Tensor:
    size = w.shape[dim] // world
    return w.narrow(dim, rank * size, size)


def load(model_dir: Path, rank: int, world: int, bug: str | None = None) -> ForCausalLM:
    """The rank's shard of the saved model; ``bug`` applies on rank 1 only."""
    cfg = json.loads((model_dir / "config.json").read_text())
    net = ForCausalLM(cfg, world)
    weights = load_file(str(model_dir / "model.safetensors"))
    weights.setdefault("lm_head.weight", weights["model.embed_tokens.weight"])  # tied
    col = ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj")
    row = ("o_proj", "down_proj")
    state = {}
    for name, w in weights.items():
        if name.rsplit(".", 2)[-2] in col:
            offset = 0 if (bug == "shard_offset" and rank == 1 and "q_proj" in name) else rank
            w = _shard(w, 0, offset, world)
        elif name.rsplit(".", 2)[-2] in row:
            w = _shard(w, 1, rank, world)
        state[name] = w
    net.load_state_dict(state, strict=False)
    return net.eval()


@torch.no_grad()
def generate(net: ForCausalLM, prompt: Sequence[int], forced: Sequence[int]) -> list[int]:
    """Greedy prefill, then one decode step per forced token (fed as the reference chose)."""
    ids = torch.tensor([list(prompt)])
    chosen = []
    pos = 0
    for token in [None, *forced]:
        step = ids if token is None else torch.tensor([[token]])
        positions = torch.arange(pos, pos + step.shape[1])[None]
        pos += step.shape[1]
        logits = net(step, positions)["logits"]
        chosen.append(int(logits[0, -1].argmax()))
    return chosen


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def worker(rank: int, world: int, port: int, model_dir: str,
           jobs: Sequence[tuple[str, str | None]], prompt: Sequence[int],
           forced: Sequence[int]) -> None:
    """One rank: join the gloo group, then record each job ``(out, bug)`` with
    ``lockstep.record`` (one dump per rank under ``out``)."""
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world)
    try:
        for out, bug in jobs:
            net = load(Path(model_dir), rank, world, bug)
            with lockstep.record(out, meta={"engine": "tp_llama", "bug": bug}) as rec:
                rec.watch(net, inputs=["*.post_attention_layernorm", "*.down_proj"])
                chosen = generate(net, prompt, forced)
                rec.add_meta(prompt_token_ids=list(prompt), generated_token_ids=chosen)
            dist.barrier()
    finally:
        dist.destroy_process_group()


def run(model_dir: Path, jobs: Sequence[tuple[Path, str | None]], prompt: Sequence[int],
        forced: Sequence[int], world: int = 2) -> None:
    """Record every job with ``world`` gloo processes on CPU."""
    import torch.multiprocessing as mp

    mp.spawn(worker, args=(world, free_port(), str(model_dir),
                           [(str(o), b) for o, b in jobs], list(prompt), list(forced)),
             nprocs=world, join=True)
