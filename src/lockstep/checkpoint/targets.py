"""``inspect ADAPTER --base MODEL``: a PEFT adapter's ``target_modules`` against the base.

Three lists, each a problem:

* targets that match no module of the base model (a typo, another architecture's name);
* modules the adapter holds LoRA tensors for that ``target_modules`` does not name;
* modules the adapter holds LoRA tensors for that the base model does not have (a wrapper's
  second path to a module, another model's layer count).

A target matches a module as PEFT matches it: a list entry matches a module whose name is
the entry or ends with ``.`` and the entry; a string is a regular expression the whole name
must match; ``all-linear`` matches every module with a 2-D weight but the embeddings and
the output layer. The base's module names come from its tensor names (the last part,
``weight`` or ``bias``, left out); a GGUF or Meta checkpoint's names that lockstep's weight
tables know are read as transformers' (``blk.3.attn_q`` is ``model.layers.3.self_attn.q_proj``).
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from ..errors import UsageError
from .components import adapted_module, adapter_of
from .sources import open_checkpoint
from .weight_names import TRANSFORMERS, canonical_weight, transformers_name, unwrap

__all__ = ["TargetCheck", "check_targets"]

_NUMBER = re.compile(r"(?<=\.)\d+(?=\.|$)")
_NOT_LINEAR = re.compile(r"(^|\.)(embed_tokens|wte|tok_embeddings|lm_head|output)$")


def _module_of(tensor: str) -> str:
    """The module a base tensor belongs to, in transformers' names where a table knows it."""
    bare = unwrap(tensor)
    module = bare.rsplit(".", 1)[0] if "." in bare else bare
    if TRANSFORMERS.lookup(bare) is None:
        canonical, known = canonical_weight(bare)
        if known:
            module = transformers_name(canonical.rsplit(".", 1)[0]) or module
    return module


def _matcher(targets: Any, linear: set[str]) -> tuple[list[str], Callable[[str, str], bool]]:
    """(the targets as listed, match(target, module))."""
    if isinstance(targets, str):
        if targets == "all-linear":
            return [targets], lambda _t, module: module in linear
        try:
            rx = re.compile(targets)
        except re.error as exc:
            raise UsageError(f"adapter_config.json: target_modules {targets[:200]!r} is not a "
                             f"regular expression: {exc}") from None
        return [targets], lambda _t, module: rx.fullmatch(module) is not None
    if isinstance(targets, list) and targets and all(isinstance(t, str) for t in targets):
        return list(targets), lambda t, module: module == t or module.endswith("." + t)
    raise UsageError("adapter_config.json: target_modules is not a list of names or a "
                     "regular expression, so there is nothing to check against the base")


def _grouped(modules: list[str]) -> list[dict[str, Any]]:
    """Module names with their numbers (layer, expert) as ``*``, each with how many."""
    counts = Counter(_NUMBER.sub("*", m) for m in modules)
    return [{"modules": name, "count": n} for name, n in sorted(counts.items())]


@dataclass
class TargetCheck:
    """The result: what matched, and the three lists of problems."""

    adapter: str
    base: str
    base_kind: str
    targets: list[str]
    base_modules: int
    adapted: int  #: modules the adapter holds LoRA tensors for
    unmatched: list[str] = field(default_factory=list)  #: targets matching no base module
    unnamed: list[str] = field(default_factory=list)  #: adapted, not named by the targets
    absent: list[str] = field(default_factory=list)  #: adapted, not in the base

    def __bool__(self) -> bool:
        return not (self.unmatched or self.unnamed or self.absent)

    def to_json(self) -> dict[str, Any]:
        return {"base": self.base, "base_kind": self.base_kind, "targets": self.targets,
                "base_modules": self.base_modules, "adapted_modules": self.adapted,
                "unmatched_targets": self.unmatched, "unnamed_modules": _grouped(self.unnamed),
                "absent_modules": _grouped(self.absent)}

    def lines(self) -> list[tuple[str, str]]:
        """(line, style) for the terminal."""
        head = (f"target_modules against {self.base} ({self.base_kind}, {self.base_modules} "
                f"modules): {self.adapted} modules adapted")
        out: list[tuple[str, str]] = [(head, "bold" if self else "bold red")]
        if self:
            out.append(("every target matches a base module, and every adapted module is "
                        "named by a target and is in the base", ""))
        if self.unmatched:
            out.append((f"targets that match no module of the base: "
                        f"{', '.join(self.unmatched)}", "red"))
        for title, modules in (("adapted modules target_modules does not name", self.unnamed),
                               ("adapted modules the base model does not have", self.absent)):
            if modules:
                out.append((f"{title}:", "red"))
                out += [(f"  {g['modules']} ({g['count']})", "") for g in _grouped(modules)]
        return out


def check_targets(adapter: str | Path, base: str | Path) -> TargetCheck:
    """Check the PEFT adapter at ``adapter`` against the base checkpoint at ``base`` (tensor
    names only; no tensor is read)."""
    ckpt = open_checkpoint(adapter)
    if ckpt.adapter is None:
        raise UsageError(f"--base checks a PEFT adapter's target_modules, and {adapter} is a "
                         f"{ckpt.kind} checkpoint, not an adapter directory")
    model = open_checkpoint(base)
    if model.adapter is not None:
        raise UsageError(f"--base {base} is an adapter; give the base model's checkpoint")
    modules: dict[str, tuple[int, ...]] = {}
    for src in model.tensors():
        module = _module_of(src.name)
        if src.name.endswith("weight") or module not in modules:
            modules[module] = src.shape
    linear = {m for m, shape in modules.items() if len(shape) == 2 and not _NOT_LINEAR.search(m)}
    targets, match = _matcher(ckpt.adapter.get("target_modules"), linear)
    adapted = sorted({unwrap(adapted_module(src.name)) for src in ckpt.tensors()
                      if adapter_of(src.name) is not None})
    return TargetCheck(
        str(ckpt.path), str(model.path), model.kind, targets, len(modules), len(adapted),
        unmatched=[t for t in targets if not any(match(t, m) for m in modules)],
        unnamed=[m for m in adapted if not any(match(t, m) for t in targets)],
        absent=[m for m in adapted if m not in modules])
