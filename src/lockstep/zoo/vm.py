"""The decode VM: one token's fused QKV projection, QK-norm and RoPE, 16 outputs at a time.

Written in the style of a megakernel interpreter (seed 001's ``layer_norm_matvec_rope_append``):
the fused ``wqkv`` weight is walked in blocks of ``BLOCK`` output rows, and the Q and K blocks
are normalised and rotated block by block. The QK-norm outputs are recorded only as blocks,
``layers.{i}.attention.q_norm.block{b}`` (and ``k_norm``), ``b`` counting the 16-element
blocks of the token's flattened (heads * head_dim) q (or k) vector.

A block cannot do two things alone: QK-norm's RMS is a statistic of the whole head, and
half-split RoPE turns element i with element i + head_dim / 2, in another block when heads
are wider than 16. So the walk takes three passes: project every block; normalise every q/k
block with its head's RMS; rotate every q/k block with its head's partner values.
"""

from __future__ import annotations

from typing import Protocol

import torch
from torch import Tensor

from ..capture.recorder import probe
from ..errors import UsageError
from .layers import RMSNorm, Rope

__all__ = ["BLOCK", "blocked_qkv", "FusedAttention"]

BLOCK = 16  #: output elements per block


class FusedAttention(Protocol):
    """What the VM reads of an attention layer (``zoo.attention.Attention`` after
    ``fuse_qkv()``); a protocol, so that this module does not import the layer that calls it."""

    @property
    def layer_id(self) -> int: ...
    @property
    def n_heads(self) -> int: ...
    @property
    def n_kv_heads(self) -> int: ...
    @property
    def head_dim(self) -> int: ...
    @property
    def bug(self) -> str | None: ...
    @property
    def wqkv(self) -> Tensor | None: ...
    @property
    def bqkv(self) -> Tensor | None: ...
    @property
    def q_norm(self) -> RMSNorm | None: ...
    @property
    def k_norm(self) -> RMSNorm | None: ...
    @property
    def rope(self) -> Rope: ...


def blocked_qkv(attn: FusedAttention, x: Tensor,
                positions: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Q, K (normed and rotated) and V of one decode token, shaped as ``Attention.project``
    gives them: (1, 1, heads, head_dim)."""
    if attn.wqkv is None:
        raise RuntimeError("the decode VM needs the fused weight: call fuse_qkv() first")
    if attn.head_dim % BLOCK:
        raise UsageError(f"the decode VM needs head_dim divisible by {BLOCK}, not "
                         f"{attn.head_dim}")
    token = x[0, 0]
    qkv = torch.empty(attn.wqkv.shape[0], dtype=x.dtype, device=x.device)
    for block in range(qkv.numel() // BLOCK):  # 1. the fused matvec, BLOCK rows at a time
        rows = slice(block * BLOCK, (block + 1) * BLOCK)
        qkv[rows] = attn.wqkv[rows] @ token
        if attn.bqkv is not None:
            qkv[rows] += attn.bqkv[rows]
    q_size, kv_size = attn.n_heads * attn.head_dim, attn.n_kv_heads * attn.head_dim
    q, k, v = qkv.split([q_size, kv_size, kv_size])

    name = f"layers.{attn.layer_id}.attention"
    if attn.q_norm is not None and attn.k_norm is not None:  # 2. QK-norm
        q = _norm_blocks(q, attn.q_norm, attn.head_dim, f"{name}.q_norm", attn.bug)
        k = _norm_blocks(k, attn.k_norm, attn.head_dim, f"{name}.k_norm", attn.bug)

    cos, sin = attn.rope.cos_sin(positions, x.dtype)  # 3. RoPE
    q = _rope_blocks(q, attn.rope, attn.head_dim, cos.flatten(), sin.flatten())
    k = _rope_blocks(k, attn.rope, attn.head_dim, cos.flatten(), sin.flatten())
    q_shape, kv_shape = (1, 1, attn.n_heads, attn.head_dim), (1, 1, attn.n_kv_heads, attn.head_dim)
    return q.view(q_shape), k.view(kv_shape), v.view(kv_shape)


def _head_of(start: int, head_dim: int) -> tuple[slice, int]:
    """The head that the block starting at ``start`` lies in, and the block's offset in it."""
    head = start // head_dim * head_dim
    return slice(head, head + head_dim), start - head


def _norm_blocks(vec: Tensor, norm: RMSNorm, head_dim: int, name: str,
                 bug: str | None) -> Tensor:
    """RMS-normalise each head of ``vec``, one block at a time, recording each block."""
    out = torch.empty_like(vec)
    for block in range(vec.numel() // BLOCK):
        start = block * BLOCK
        head, offset = _head_of(start, head_dim)
        values = vec[start:start + BLOCK]
        stats = vec[head]  # the RMS is the whole head's ...
        if bug == "blocked_qk_norm":
            stats = values  # ... not the block's, as seed 001's VM took it
        normed = norm.scale[offset:offset + BLOCK] * norm.normalize(values, stats)
        probe(f"{name}.block{block}", normed)
        out[start:start + BLOCK] = normed
    return out


def _rope_blocks(vec: Tensor, rope: Rope, head_dim: int, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate each head of ``vec``, one block at a time; the partners come from the head."""
    out = torch.empty_like(vec)
    for block in range(vec.numel() // BLOCK):
        start = block * BLOCK
        head, offset = _head_of(start, head_dim)
        angles = slice(offset, offset + BLOCK)
        partners = rope.rotate_half(vec[head])[angles]
        out[start:start + BLOCK] = vec[start:start + BLOCK] * cos[angles] + partners * sin[angles]
    return out
