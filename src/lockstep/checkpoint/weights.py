"""A live model against the checkpoint it should hold: which parameters loaded, which did not.

Parameters and persistent buffers are paired with the checkpoint's tensors through the
weight-name tables (so a transformers model pairs with its GGUF file, Q/K row order undone),
one checkpoint tensor in memory at a time. A parameter is *equal* when it holds the
checkpoint's values rounded to its own dtype (within one unit in the last place); one that
differs and looks like a default initialisation (a norm weight of all ones, a bias of zeros,
or values with an init's spread and no correlation with the checkpoint) is a *fresh init*:
its weights were never loaded.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from ..atomic import write_json_file
from ..extras import require
from ..jsontext import json_number
from .against import (
    Heads,
    config_heads,
    heads_of,
    match_layout,
    pair_errors,
)
from .float8 import float8_scales, scale_like
from .fused import expert_errors, fuse_parts, part_errors, stack_experts
from .placement import PlacementMap, placement_map
from .shards import distributed_rank, shard_offsets
from .sources import open_checkpoint
from .tensors import TensorSource, read_array
from .weight_mapping import Rename
from .weight_names import canonical_weight, layer_index, role

__all__ = ["ParamCheck", "LayerSummary", "LoadCheck", "check_loaded", "STATUSES"]

#: every status a parameter can get, problems after "equal"
STATUSES = ("equal", "different", "fresh init", "shape", "not materialized",
            "missing from checkpoint", "missing from model")

_LAYER = re.compile(r"^(.*?(?:^|\.)(?:layers|layer|h|blocks|block)\.\d+)\.")


@dataclass(frozen=True)
class ParamCheck:
    """One parameter or buffer of the model (or a checkpoint tensor the model lacks)."""

    name: str  #: the model's name for it (the checkpoint's when the model lacks it)
    checkpoint_name: str | None  #: None: missing from the checkpoint
    status: str  #: one of STATUSES
    layer: str  #: the layer it belongs to ("model.layers.3"), else its module's name
    dtype: str | None = None  #: the model's dtype ("float32"); None if missing from the model
    shape: tuple[int, ...] | None = None
    checkpoint_dtype: str | None = None  #: "F32", "Q4_1", "bfloat16", ...
    transform: str = ""  #: layout that brought the checkpoint's tensor to the model's
    max_abs: float | None = None
    rel_l2: float | None = None
    note: str = ""  #: why it looks like a fresh init, or what else is known
    constant: bool = False  #: the checkpoint's tensor is one repeated value (all ones...)
    #: Pearson's r with the checkpoint's tensor where it is within noise (other values than
    #: the checkpoint's, whatever their spread), else None
    uncorrelated_r: float | None = None
    #: the checkpoint tensor whose values it holds exactly, where that is another tensor's
    values_of: str | None = None

    @property
    def other_values(self) -> bool:
        """Values that are not the checkpoint's nor another tensor's: never loaded, whatever
        their spread (a fresh init, an engine's own init)."""
        return self.status == "fresh init" or (
            self.status == "different" and self.uncorrelated_r is not None
            and self.values_of is None)

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "checkpoint_name": self.checkpoint_name,
                "status": self.status, "layer": self.layer, "dtype": self.dtype,
                "shape": None if self.shape is None else list(self.shape),
                "checkpoint_dtype": self.checkpoint_dtype, "transform": self.transform,
                "max_abs": json_number(self.max_abs), "rel_l2": json_number(self.rel_l2),
                "note": self.note, "uncorrelated_r": json_number(self.uncorrelated_r),
                "values_of": self.values_of}


@dataclass(frozen=True)
class LayerSummary:
    """One layer's (or top-level module's) tensors: how many of each status, and a verdict."""

    layer: str
    tensors: int
    counts: dict[str, int] = field(default_factory=dict)  #: status -> tensors
    verdict: str = "loaded"  #: "loaded", "not loaded", "partly loaded", "differs", "missing"

    def to_json(self) -> dict[str, Any]:
        return {"layer": self.layer, "tensors": self.tensors, "counts": self.counts,
                "verdict": self.verdict}


@dataclass(frozen=True)
class LoadCheck:
    """The model against its checkpoint; truthy when every tensor is equal."""

    checkpoint: str
    kind: str
    params: tuple[ParamCheck, ...]
    layers: tuple[LayerSummary, ...]
    placement: PlacementMap

    def __bool__(self) -> bool:
        return all(p.status == "equal" for p in self.params)

    @property
    def problems(self) -> list[ParamCheck]:
        return [p for p in self.params if p.status != "equal"]

    @property
    def not_loaded(self) -> list[str]:
        """Layers whose weights (some or all) were not loaded."""
        return [s.layer for s in self.layers if s.verdict in ("not loaded", "partly loaded")]

    def to_json(self) -> dict[str, Any]:
        counts = Counter(p.status for p in self.params)
        return {"checkpoint": self.checkpoint, "kind": self.kind, "passed": bool(self),
                "summary": {"tensors": len(self.params),
                            **{s: counts.get(s, 0) for s in STATUSES}},
                "not_loaded": self.not_loaded,
                "layers": [s.to_json() for s in self.layers],
                "problems": [p.to_json() for p in self.problems],
                "params": [p.to_json() for p in self.params],
                "placement": self.placement.to_json()}

    def write_json(self, path: str | Path) -> None:
        write_json_file(self.to_json(), path)


def _layer_of(name: str) -> str:
    m = _LAYER.match(name)
    return m.group(1) if m else (name.rpartition(".")[0] or name)


def _cast_equal(x: np.ndarray, p: np.ndarray, eps: float, tiny: float) -> bool:
    """``p`` is ``x`` rounded to a dtype of machine epsilon ``eps`` (NaN equals NaN)."""
    d = np.abs(p.astype(np.float64) - x)
    ok = (d <= eps * np.abs(x) + tiny) | (p == x) | (np.isnan(p) & np.isnan(x))
    return bool(ok.all())


def _init_stds(shape: tuple[int, ...], init_range: float | None) -> list[tuple[str, float]]:
    out = [(f"normal(0, {init_range:g})", init_range)] if init_range else []
    out.append(("normal(0, 0.02)", 0.02))
    if len(shape) == 2 and shape[1]:
        out.append(("torch's uniform(±1/sqrt(fan_in))", 1 / math.sqrt(3 * shape[1])))
        out.append(("normal(0, 1/sqrt(fan_in))", 1 / math.sqrt(shape[1])))
        out.append(("torch's Embedding normal(0, 1)", 1.0))
    return out


def _fresh_init(p: np.ndarray, x: np.ndarray, init_range: float | None,
                found: tuple[float, float, float] | None) -> str:
    """Why ``p`` looks like a default initialisation rather than the checkpoint's ``x``;
    ``found``: ``_correlation(p, x)``."""
    if p.size == 0:
        return ""
    if np.all(p == 1.0) and not np.all(x == 1.0):
        return "all ones: a norm's init"
    if np.all(p == 0.0) and not np.all(x == 0.0):
        return "all zeros: a bias's init"
    if found is None:
        return ""
    corr, std, noise = found
    if not _within_noise(found) or abs(float(p.mean())) > 0.1 * std + noise * std:
        return ""
    for label, s in _init_stds(p.shape, init_range):
        if abs(std / s - 1) < 0.15:
            return f"std {std:.3g} ~ {label} init, uncorrelated (r={corr:.2f})"
    return ""


def _correlation(p: np.ndarray, x: np.ndarray) -> tuple[float, float, float] | None:
    """(Pearson's r between ``p`` and ``x``, ``p``'s std, the r that noise alone reaches at
    this size), or None where r means nothing (fewer than 64 values, non-finite, constant)."""
    pf, xf = p.reshape(-1).astype(np.float64), x.reshape(-1).astype(np.float64)
    if p.size < 64 or not (np.isfinite(pf).all() and np.isfinite(xf).all()):
        return None
    std, xstd = float(pf.std()), float(xf.std())
    if std == 0.0:
        return None
    corr = float(((pf - pf.mean()) * (xf - xf.mean())).mean() / (std * xstd)) if xstd else 0.0
    return corr, std, 4 / math.sqrt(p.size)


def _within_noise(found: tuple[float, float, float]) -> bool:
    """No correlation beyond what noise gives (or 0.1): other values than the checkpoint's."""
    return abs(found[0]) <= max(0.1, found[2])


def _rounding(torch: Any, t: Any) -> tuple[float, float]:
    """(machine epsilon, smallest normal) of a tensor's dtype; (0, 0) for integers."""
    fin = torch.finfo(t.dtype) if t.is_floating_point() else None
    return (float(fin.eps), float(fin.tiny)) if fin else (0.0, 0.0)


def _whose_values(torch: Any, checks: list[ParamCheck], state: dict[str, Any],
                  keys: dict[str, str], sources: dict[str, TensorSource]) -> list[ParamCheck]:
    """``checks`` with each uncorrelated tensor that holds another checkpoint tensor's values
    of the same op (another layer's: a loader's wrong layer index or offset) named so, and
    "different": one that looked like a fresh init by its spread is not one when its values
    are a checkpoint tensor's, exactly. Only the checkpoint tensors of an op with such a
    tensor, of its shape, are read again, one at a time."""
    suspects: dict[str, list[ParamCheck]] = {}
    for c in checks:
        if c.uncorrelated_r is not None and keys.get(c.name) in sources:
            suspects.setdefault(role(keys[c.name]), []).append(c)
    found: dict[str, str] = {}
    for key, src in sources.items():
        wanted = [c for c in suspects.get(role(key), ())
                  if keys[c.name] != key and tuple(src.shape) == c.shape and c.name not in found]
        if not wanted:
            continue
        arr = read_array(src)
        for c in wanted:
            t = state[c.name].detach().to("cpu")
            if _cast_equal(arr, t.to(torch.float64).numpy(), *_rounding(torch, t)):
                found[c.name] = src.name
        del arr
    return [replace(c, status="different", values_of=found[c.name],
                    note=f"holds {found[c.name]}'s values: loaded from the wrong tensor "
                         f"(uncorrelated with its own, r={c.uncorrelated_r:.2f})")
            if c.name in found else c for c in checks]


def _compare(torch: Any, name: str, t: Any, src: TensorSource, arr: np.ndarray, key: str,
             heads: Heads, layer: str, init_range: float | None, tied: bool,
             parts: Sequence[int] = (), scale: tuple[str, np.ndarray] | None = None,
             breakdown: Callable[[np.ndarray, np.ndarray], str] | None = None) -> ParamCheck:
    base = ParamCheck(name, src.name, "not materialized", layer,
                      str(t.dtype).removeprefix("torch."), tuple(t.shape), src.dtype,
                      note="the checkpoint's token embedding (tied lm_head)" if tied else "")
    if t.device.type == "meta":
        return base
    cpu = t.detach().to("cpu")
    wide = torch.float64 if cpu.dtype == torch.float64 else torch.float32
    p = cpu.to(wide).numpy()
    eps, tiny = _rounding(torch, cpu)
    unit = np.ones((1,) * p.ndim)
    by = scale_like(scale[1], p.shape, parts) if scale is not None else unit
    if by is None:
        by, scale = unit, None  # a scale that fits no known layout: compare as stored
    if scale is not None:
        base = replace(base, note=f"float8, times {scale[0]}")
    found = match_layout(arr, p, key, heads, lambda x, b: (
        True, 0.0) if _cast_equal(x / by, b, eps, tiny) else (False, pair_errors(b * by, x)[1]),
        parts)
    if found is None:
        return replace(base, status="shape", note=f"checkpoint shape {list(src.shape)}")
    transform, _, x, equal = found
    constant = bool(x.size) and bool(np.all(x.reshape(-1) == x.reshape(-1)[0]))
    if equal:
        return replace(base, status="equal", transform=transform, constant=constant)
    p = p * by  # the values the weight stands for
    max_abs, rel = pair_errors(p, x)
    corr = _correlation(p, x)  # (once: the fresh-init test and the note both use it)
    r = corr[0] if corr is not None and _within_noise(corr) else None
    why = _fresh_init(p, x, init_range, corr)
    note = why or base.note or ("" if r is None else (
        f"uncorrelated with the checkpoint (r={r:.2f}): not its values, so never loaded or "
        "loaded from another tensor"))
    if breakdown is not None and not transform:  # which parts (or experts) differ
        note = "; ".join(filter(None, (note, breakdown(p, x))))
    return replace(base, status="fresh init" if why else "different", transform=transform,
                   max_abs=max_abs, rel_l2=rel, constant=constant, note=note, uncorrelated_r=r)


def _verdict(checks: list[ParamCheck]) -> str:
    counts = Counter(c.status for c in checks)
    if counts["equal"] == len(checks):
        return "loaded"
    if counts["missing from checkpoint"] == len(checks):
        return "missing from checkpoint"
    if counts["missing from model"] == len(checks):
        return "missing from model"
    unloaded = sum(c.other_values for c in checks) + counts["not materialized"]
    informative = sum(1 for c in checks if c.status == "equal" and not c.constant)
    if unloaded and not informative:
        return "not loaded"
    return "partly loaded" if unloaded else "differs"


def _summaries(checks: list[ParamCheck]) -> tuple[LayerSummary, ...]:
    groups: dict[str, list[ParamCheck]] = {}
    for c in checks:
        groups.setdefault(c.layer, []).append(c)
    return tuple(LayerSummary(layer, len(items), dict(Counter(c.status for c in items)),
                              _verdict(items)) for layer, items in groups.items())


def _parts_differing(parts: list[tuple[str, TensorSource]]
                     ) -> Callable[[np.ndarray, np.ndarray], str]:
    """A fused parameter's note: its parts whose rows differ, and those that are equal."""
    def note(p: np.ndarray, x: np.ndarray) -> str:
        errors = part_errors(p, x, parts)
        bad = [f"{name} (rel L2 {err:.3g})" for name, err in errors if not err <= 1e-6]
        good = [name for name, err in errors if err <= 1e-6]
        return f"rows of {', '.join(bad)} differ" + (f"; {', '.join(good)} equal" if good
                                                      else "")
    return note


def _experts_differing(p: np.ndarray, x: np.ndarray) -> str:
    """An all-experts parameter's note: the experts that differ."""
    errors = expert_errors(p, x)
    bad = [f"{i} (rel L2 {err:.3g})" for i, err in enumerate(errors) if not err <= 1e-6]
    return (f"experts {', '.join(bad[:8])}{' ...' if len(bad) > 8 else ''} of {len(errors)} "
            f"differ; {len(errors) - len(bad)} equal")


def _expert_parts(key: str, src: TensorSource) -> list[int]:
    """The rows of each part within each expert of an all-experts gate_up stack."""
    if role(key) == "experts_gate_up" and len(src.shape) == 3 and src.shape[1] % 2 == 0:
        return [src.shape[1] // 2] * 2
    return []


def check_loaded(model: Any, checkpoint: str | Path, *, heads: Heads | None = None,
                 rename: Rename | None = None, shard: tuple[int, int] | None = None
                 ) -> LoadCheck:
    """Compare a torch ``nn.Module``'s parameters and buffers with the checkpoint at
    ``checkpoint`` (any format ``lockstep inspect`` reads), and map where they are placed.

    Fused parameters (``qkv_proj``, ``gate_up_proj``) pair with their parts stacked by rows.
    ``rename(name, side)`` gives the checkpoint's name for a model name (side "cand") and
    keeps a checkpoint name (side "ref"), or None to leave the tensor out (a mapping file's
    rules and ignore globs: checkpoint/weight_mapping.py). ``shard`` (rank, world size): the
    tensor-parallel rank this model is, which each of its sharded weights should hold the
    shard of (default: torch.distributed's rank, where it is initialized; without either, the
    shard most of its sharded tensors hold).

    Raises CheckpointError (a LockstepError) for a missing, corrupt or truncated checkpoint.
    """
    torch = require("torch", "torch")
    ckpt = open_checkpoint(checkpoint)
    config = getattr(model, "config", None)
    as_dict = config.to_dict() if config is not None and hasattr(config, "to_dict") else {}
    init_range = as_dict.get("initializer_range") if isinstance(
        as_dict.get("initializer_range"), float) else None
    geometry = (heads or Heads()).merged(config_heads(as_dict)).merged(heads_of(ckpt))
    state = model.state_dict(keep_vars=True)
    if rename is not None:
        state = {name: t for name, t in state.items() if rename(name, "cand") is not None}
    keys = {name: canonical_weight(name if rename is None else rename(name, "cand") or "")[0]
            for name in state}
    sources: dict[str, TensorSource] = {}
    for src in ckpt.tensors():
        if rename is None or rename(src.name, "ref") is not None:
            sources.setdefault(canonical_weight(src.name)[0], src)
    fused = fuse_parts(sources, keys.values())
    experts = stack_experts(sources, keys.values())
    scales, own = float8_scales(torch, state, sources)
    state = {n: t for n, t in state.items() if n not in own}
    users: dict[str, list[tuple[str, bool]]] = {}
    layers = {name: _layer_of(name) for name in state}
    by_index = {layer_index(keys[n]): layers[n] for n in state}
    checks: list[ParamCheck] = []
    for name, t in state.items():
        key = keys[name]
        if key in sources:
            users.setdefault(key, []).append((name, False))
        elif key == "lm_head.weight" and "embed.weight" in sources:
            users.setdefault("embed.weight", []).append((name, True))
        else:
            checks.append(ParamCheck(name, None, "missing from checkpoint", layers[name],
                                     str(t.dtype).removeprefix("torch."), tuple(t.shape)))
    for key, src in sources.items():
        if key not in users:
            layer = by_index.get(layer_index(key)) if layer_index(key) is not None else None
            checks.append(ParamCheck(src.name, src.name, "missing from model",
                                     layer or _layer_of(src.name), checkpoint_dtype=src.dtype,
                                     shape=src.shape))
            continue
        arr = read_array(src)
        for name, tied in users[key]:
            check = _compare(torch, name, state[name], src, arr, key, geometry,
                             layers[name], init_range, tied,
                             [part.shape[0] for _, part in fused.get(key, ())]
                             or _expert_parts(key, src), scales.get(name),
                             _parts_differing(fused[key]) if key in fused
                             else _experts_differing if key in experts else None)
            checks.append(check)
        del arr
    checks = shard_offsets(_whose_values(torch, checks, state, keys, sources),
                           shard or distributed_rank())
    order = {name: i for i, name in enumerate(state)}
    checks.sort(key=lambda c: order.get(c.name, len(order)))
    return LoadCheck(str(ckpt.path), ckpt.kind, tuple(checks), _summaries(checks),
                     placement_map(model))
