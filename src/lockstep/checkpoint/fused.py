"""Fused weights: one tensor that stacks several checkpoint tensors by rows, or all of a
mixture-of-experts layer's experts into one 3-d tensor.

vLLM and SGLang (and Phi-3's checkpoints) hold ``qkv_proj`` (q, k, v rows stacked, in that
order) and ``gate_up_proj`` (gate rows, then up) where transformers' Llama and Qwen checkpoints
hold the parts. When one side has the fused tensor and the other its parts, the parts are
stacked into one source that pairs with it: row-major, stacking by rows is the parts'
elements one after the other, so it is read one part at a time.
"""

from __future__ import annotations

import itertools
import math
from typing import Callable, Iterable, Iterator, Sequence

import numpy as np

from .tensors import TensorSource, read_array
from .weight_names import EXPERT_STACKS, FUSED

__all__ = ["fuse_parts", "part_errors", "stack_experts", "expert_errors"]


def _split(key: str) -> tuple[str, str, str] | None:
    """("layers.N.", fused role, ".weight") of a fused canonical key, else None."""
    parts = key.split(".")
    if len(parts) == 4 and parts[0] == "layers" and parts[2] in FUSED:
        return f"layers.{parts[1]}.", parts[2], "." + parts[3]
    return None


def _stack(parts: list[tuple[str, TensorSource]]) -> TensorSource | None:
    srcs = [s for _, s in parts]
    rest = {s.shape[1:] for s in srcs}
    if len(rest) != 1 or any(not s.shape for s in srcs):
        return None  # parts that do not stack by rows
    dtypes = {s.dtype for s in srcs}
    shape = (sum(s.shape[0] for s in srcs), *srcs[0].shape[1:])
    return TensorSource(
        "+".join(s.name for s in srcs), dtypes.pop() if len(dtypes) == 1 else srcs[0].dtype,
        shape, sum(s.nbytes for s in srcs),
        lambda: itertools.chain.from_iterable(s.chunks() for s in srcs))


def fuse_parts(sources: dict[str, TensorSource], wanted: Iterable[str]
               ) -> dict[str, list[tuple[str, TensorSource]]]:
    """For each fused key in ``wanted`` that ``sources`` lacks but holds every part of, put
    the stacked parts into ``sources`` under that key and drop the parts; returns
    {fused key: [(part key, part source), ...]} for what was stacked."""
    done: dict[str, list[tuple[str, TensorSource]]] = {}
    for key in wanted:
        split = _split(key)
        if split is None or key in sources:
            continue
        prefix, fused, suffix = split
        keys = [prefix + part + suffix for part in FUSED[fused]]
        if not all(k in sources for k in keys):
            continue
        parts = [(k, sources[k]) for k in keys]
        stacked = _stack(parts)
        if stacked is None:
            continue
        for k in keys:
            del sources[k]
        sources[key] = stacked
        done[key] = parts
    return done


def part_errors(x: np.ndarray, b: np.ndarray, parts: Sequence[tuple[str, TensorSource]]
                ) -> list[tuple[str, float]]:
    """(part's tensor name, relative L2 error) of each part's rows of ``x`` against ``b``."""
    out, start = [], 0
    for _, src in parts:
        rows = src.shape[0]
        out.append((src.name, _rel_l2(x[start:start + rows], b[start:start + rows])))
        start += rows
    return out


def _rel_l2(x: np.ndarray, b: np.ndarray) -> float:
    """``||x - b|| / ||b||`` in float64 (0 for two zero tensors, inf against zeros)."""
    b64 = b.astype(np.float64)
    norm, diff = float(np.linalg.norm(b64)), float(np.linalg.norm(x.astype(np.float64) - b64))
    return diff / norm if norm else (0.0 if diff == 0 else math.inf)


def _experts(sources: dict[str, TensorSource], prefix: str, part: str, suffix: str
             ) -> list[TensorSource]:
    """Each expert's ``part`` tensor in order from expert 0, while there is one."""
    found: list[TensorSource] = []
    while f"{prefix}experts.{len(found)}.{part}{suffix}" in sources:
        found.append(sources[f"{prefix}experts.{len(found)}.{part}{suffix}"])
    return found


def _in_turn(order: list[TensorSource]) -> Callable[[], Iterator[np.ndarray]]:
    return lambda: itertools.chain.from_iterable(s.chunks() for s in order)


def _joined(gate: TensorSource, up: TensorSource) -> Callable[[], Iterator[np.ndarray]]:
    """Expert by expert: its gate rows, then its up rows."""
    def chunks() -> Iterator[np.ndarray]:
        g, u = read_array(gate), read_array(up)
        for i in range(g.shape[0]):
            yield g[i].reshape(-1)
            yield u[i].reshape(-1)
    return chunks


def stack_experts(sources: dict[str, TensorSource], wanted: Iterable[str]) -> dict[str, int]:
    """For each all-experts key in ``wanted`` (``layers.N.experts_gate_up.weight``, ...) that
    ``sources`` lacks, put the one it can be made of into ``sources``: each expert's parts
    (``layers.N.experts.E.gate.weight`` then ``.up.``, for each expert in turn: [E, rows, in]),
    or, for ``experts_gate_up``, the stacked ``experts_gate`` and ``experts_up`` joined
    expert by expert (llama.cpp's ``ffn_gate_exps`` and ``ffn_up_exps``). The tensors used
    leave ``sources``. Returns {key: number of experts} of what was stacked."""
    done: dict[str, int] = {}
    used: set[str] = set()
    for key in wanted:
        parts = key.split(".")
        if len(parts) != 4 or parts[0] != "layers" or parts[2] not in EXPERT_STACKS \
                or key in sources:
            continue
        prefix, suffix = f"layers.{parts[1]}.", "." + parts[3]
        roles = EXPERT_STACKS[parts[2]]
        each = [_experts(sources, prefix, r, suffix) for r in roles]
        count = len(each[0])
        if count and all(len(e) == count for e in each) and len(
                {tuple(s.shape[1:]) for e in each for s in e}) == 1 and all(
                len(s.shape) == 2 for e in each for s in e):
            order = [e[i] for i in range(count) for e in each]
            rows = sum(e[0].shape[0] for e in each)
            sources[key] = TensorSource(
                f"{order[0].name} ... {order[-1].name} ({count} experts)", order[0].dtype,
                (count, rows, order[0].shape[1]), sum(s.nbytes for s in order),
                _in_turn(order))
            done[key] = count
            used.update(f"{prefix}experts.{i}.{r}{suffix}" for i in range(count) for r in roles)
            continue
        gate, up = (sources.get(f"{prefix}experts_{r}{suffix}") for r in ("gate", "up"))
        if parts[2] == "experts_gate_up" and gate is not None and up is not None \
                and len(gate.shape) == 3 and gate.shape == up.shape:
            sources[key] = TensorSource(
                f"{gate.name}+{up.name}", gate.dtype,
                (gate.shape[0], 2 * gate.shape[1], gate.shape[2]), gate.nbytes + up.nbytes,
                _joined(gate, up))
            done[key] = gate.shape[0]
            used.update(f"{prefix}experts_{r}{suffix}" for r in ("gate", "up"))
    for k in used:
        sources.pop(k, None)
    return done


def expert_errors(x: np.ndarray, b: np.ndarray) -> list[float]:
    """The relative L2 error of each expert's slice (the first axis) of ``x`` against ``b``."""
    return [_rel_l2(xs, bs) for xs, bs in zip(x, b)]
