"""Time per module, in the engine's own process: forward pre/post hooks on every module of the
engine's torch module tree, each call's exclusive time (its own time, less its children's)
grouped by layer and by kind (attention, mlp, norm, embedding, lm_head, rope; for a
mixture-of-experts block its router, experts, shared_expert and the block's own time, moe;
the rest) and by module class.

On CPU the hooks read ``perf_counter``; on CUDA they record events, resolved after the run
with one synchronize (none per module). The exclusive times of one run add up to the root
modules' time with hooks; the hooks' own cost is measured as the hooked run's time less a
plain run's, and reported.
"""

from __future__ import annotations

import re
import statistics
import time
from collections import defaultdict
from typing import Any, Sequence

from ..capture.eager import eager

__all__ = ["module_times", "kind_of"]

_LAYER = re.compile(r"(?:^|\.)(?:layers|layer|h|blocks)\.(\d+)(?:\.|$)")
_KINDS = (  # (kind, class-name pattern, module-name pattern): the first that matches
    # a MoE block's parts before the block: its router (transformers' TopKRouter, the zoo's
    # Router), its routed experts (all of them, or one), its shared expert(s) and their gate;
    # "moe" is then the block's own time (top-k, weighting, combining the experts' rows)
    ("router", r"router", r"(^|\.)(router|(mlp|feed_forward|block_sparse_moe|moe)\.gate)$"),
    ("experts", r"experts$", r"(^|\.)experts$"),
    ("shared_expert", None, r"(^|\.)shared_experts?(_gate)?$"),
    ("moe", r"sparsemoe|moeblock|moelayer|moe$", r"(^|\.)(block_sparse_moe|moe)$"),
    ("attention", r"attention|attn", r"(^|\.)(self_attn|attention|attn)$"),
    ("mlp", r"mlp|feedforward", r"(^|\.)(mlp|feed_forward|ffn)$"),
    ("norm", r"norm", r"norm$"),
    ("rope", r"rotary|rope", r"rotary_emb$"),
    ("embedding", r"embedding", r"(embed_tokens|tok_embeddings|wte)$"),
    ("lm_head", None, r"(^|\.)(lm_head|output)$"),
)


def kind_of(name: str, cls: str) -> str | None:
    """The kind of a module from its name in the tree and its class name, or None."""
    low = cls.lower()
    for kind, cls_pat, name_pat in _KINDS:
        if re.search(name_pat, name) or (cls_pat is not None and re.search(cls_pat, low)):
            return kind
    return None


def _layer(name: str) -> int | None:
    m = _LAYER.search(name)
    return int(m.group(1)) if m else None


class _Timer:
    """The hooks: every call's start/end and its parent call, resolved to seconds later."""

    def __init__(self, root: Any, cuda: bool) -> None:
        import torch

        self.torch = torch
        self.cuda = cuda
        self.calls: list[list[Any]] = []  # [module index, parent call, start, end]
        self.stack: list[int] = []
        self.modules: list[tuple[str, str, str, int | None]] = []  # name, class, kind, layer
        self.handles: list[Any] = []
        inherited: dict[str, str] = {}
        for index, (name, module) in enumerate(root.named_modules()):
            parent = name.rsplit(".", 1)[0] if "." in name else ""
            own = kind_of(name, type(module).__name__) if name else None
            kind = own or inherited.get(parent) or ("layer" if _layer(name) is not None
                                                    else "other")
            inherited[name] = own or inherited.get(parent, "")
            self.modules.append((name, type(module).__name__, kind, _layer(name)))
            # plain Python inside a torch.compile'd model (a graph break at each module)
            self.handles.append(module.register_forward_pre_hook(eager(self._pre(index))))
            self.handles.append(module.register_forward_hook(eager(self._post())))

    def _now(self) -> Any:
        if self.cuda:
            event = self.torch.cuda.Event(enable_timing=True)
            event.record()
            return event
        return time.perf_counter()

    def _pre(self, index: int) -> Any:
        def hook(module: Any, args: Any) -> None:
            parent = self.stack[-1] if self.stack else -1
            self.calls.append([index, parent, self._now(), None])
            self.stack.append(len(self.calls) - 1)
        return hook

    def _post(self) -> Any:
        def hook(module: Any, args: Any, output: Any) -> None:
            if self.stack:
                self.calls[self.stack.pop()][3] = self._now()
        return hook

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()

    def resolve(self) -> list[tuple[int, int, float]]:
        """(module index, parent call, inclusive seconds) of every call, in call order (a
        call that never returned, its forward having raised, counts 0)."""
        if self.cuda:
            self.torch.cuda.synchronize()
            return [(i, p, s.elapsed_time(e) / 1e3 if e is not None else 0.0)
                    for i, p, s, e in self.calls]
        return [(i, p, e - s if e is not None else 0.0) for i, p, s, e in self.calls]


def _on_cuda(root: Any) -> bool:
    param = next(iter(root.parameters()), None)
    return param is not None and param.device.type == "cuda"


def module_times(engine: Any, prompt_ids: Sequence[int], steps: int, *, iters: int,
                 warmup: int) -> dict[str, Any]:
    """Time ``engine.step_times(prompt_ids, steps)`` plain and with per-module hooks; the
    medians per module kind, class and layer (milliseconds). ``available`` False, with
    ``why``, for an engine that has no torch module tree."""
    root = engine.torch_module()
    if root is None:
        why = (f"the {engine.name} engine has no torch module tree to time")
        if engine.name == "llama.cpp":
            why = ("llama.cpp exposes whole-eval timings only (llama_perf_context); no per-op "
                   "timer is reachable through its API")
        return {"available": False, "why": why}
    cuda = _on_cuda(root)
    run = _one_generation(engine, prompt_ids, steps)
    for _ in range(max(warmup, 1)):
        run()
    plain: list[float] = []
    hooked: list[float] = []
    per_run: list[dict[str, dict[Any, float]]] = []
    for _ in range(iters):  # plain and hooked runs interleaved: a slow spell slows both
        plain.append(run())
        timer = _Timer(root, cuda)
        try:
            hooked.append(run())
        finally:
            timer.remove()
        per_run.append(_exclusive(timer))
    # the breakdown of the run whose hooked time is the median: one run's rows add up
    middle = sorted(range(iters), key=hooked.__getitem__)[iters // 2]
    med = {key: {k: v * 1e3 for k, v in per_run[middle][key].items()}
           for key in ("kind", "class", "layer_kind", "total")}
    plain_ms = statistics.median(plain) * 1e3
    hooked_ms = hooked[middle] * 1e3
    in_modules = med["total"].get("all", 0.0)
    return {
        "available": True, "clock": "cuda events" if cuda else "perf_counter",
        "run": "the run with the median time with hooks, of the iterations",
        "steps": steps, "iters": iters,
        "plain_ms": plain_ms, "hooked_ms": hooked_ms,
        "overhead_ms": hooked_ms - plain_ms,
        "in_modules_ms": in_modules, "outside_modules_ms": max(hooked_ms - in_modules, 0.0),
        "by_kind": dict(sorted(med["kind"].items(), key=lambda kv: -kv[1])),
        "by_class": dict(sorted(med["class"].items(), key=lambda kv: -kv[1])),
        "by_layer": dict(sorted(med["layer_kind"].items())),
    }


def _one_generation(engine: Any, prompt_ids: Sequence[int], steps: int) -> Any:
    """A callable running one greedy generation of ``steps`` steps and returning its elapsed
    seconds: the engine's own ``step_times`` where it times one generation itself, else one
    ``decode_logits`` call. Not the base ``Engine.step_times``, which estimates from two
    generations: the hooks would see both while the total counted one (the rows then added
    up to more than the total, on a ``py:`` engine that only implements ``decode_logits``).
    Timed from outside the call, so that every module call the hooks see lies within it."""
    from ..engines.base import Engine

    own = getattr(type(engine), "step_times", None) is not Engine.step_times

    def run() -> float:
        t0 = time.perf_counter()
        if own:
            engine.step_times(prompt_ids, steps)  # (it synchronizes a GPU before returning)
        else:
            engine.decode_logits(prompt_ids, steps)  # (logits on the host: synchronized)
        return time.perf_counter() - t0
    return run


def _exclusive(timer: _Timer) -> dict[str, dict[Any, float]]:
    """Exclusive seconds of one run, summed by kind, class and "layer:kind"; the root calls'
    inclusive sum as total["all"]."""
    calls = timer.resolve()
    children = [0.0] * len(timer.calls)
    for _, parent, incl in calls:
        if parent >= 0:
            children[parent] += incl
    out: dict[str, dict[Any, float]] = {"kind": defaultdict(float), "class": defaultdict(float),
                                        "layer_kind": defaultdict(float),
                                        "total": defaultdict(float)}
    for n, (index, parent, incl) in enumerate(calls):
        name, cls, kind, layer = timer.modules[index]
        own = max(incl - children[n], 0.0)
        out["kind"][kind] += own
        out["class"][cls] += own
        out["layer_kind"][f"{'-' if layer is None else layer}:{kind}"] += own
        if parent < 0:
            out["total"]["all"] += incl
    return out
