"""Where a live model's weights are: the device and dtype of every module that owns tensors,
and the modules that differ from the rest (the one layer left on the CPU, or in float64)."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Any

__all__ = ["ModulePlacement", "PlacementMap", "placement_map"]


@dataclass(frozen=True)
class ModulePlacement:
    """One module's own parameters and buffers (not its children's)."""

    name: str  #: as ``named_modules()`` names it ("" for the root)
    device: str  #: "cpu", "cuda:0", "meta"; several joined by "+" when they differ
    dtype: str  #: of its floating parameters ("float32"); "+"-joined when mixed; "-" if none
    params: int  #: parameter elements it owns (a tied one counted at its first module only)
    buffers_only: bool = False  #: owns buffers but no parameters (judged by device only)
    outlier: str = ""  #: why it stands out ("device cuda:0, not cpu"), or ""

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "device": self.device, "dtype": self.dtype,
                "params": self.params, "buffers_only": self.buffers_only,
                "outlier": self.outlier}


@dataclass(frozen=True)
class PlacementMap:
    """Every tensor-owning module's placement; truthy when none differs from the majority."""

    modules: tuple[ModulePlacement, ...]
    device: str  #: the majority device (counted in modules with parameters)
    dtype: str  #: the majority dtype

    def __bool__(self) -> bool:
        return not self.outliers

    @property
    def outliers(self) -> list[ModulePlacement]:
        return [m for m in self.modules if m.outlier]

    def groups(self) -> list[dict[str, Any]]:
        """One row per (device, dtype): how many modules and parameter elements."""
        rows: dict[tuple[str, str], dict[str, Any]] = {}
        for m in self.modules:
            row = rows.setdefault((m.device, m.dtype), {"device": m.device, "dtype": m.dtype,
                                                        "modules": 0, "params": 0})
            row["modules"] += 1
            row["params"] += m.params
        return sorted(rows.values(), key=lambda r: -r["modules"])

    def to_json(self) -> dict[str, Any]:
        return {"device": self.device, "dtype": self.dtype, "groups": self.groups(),
                "outliers": [m.to_json() for m in self.outliers],
                "modules": [m.to_json() for m in self.modules]}


def _joined(values: list[str]) -> str:
    return "+".join(sorted(set(values))) if values else "-"


def placement_map(model: Any) -> PlacementMap:
    """The placement of every module of ``model`` (a torch ``nn.Module``) owning tensors."""
    found = []
    counted: set[int] = set()  # a tied parameter counts once, at its first module
    for name, module in model.named_modules():
        params = [p for _, p in module.named_parameters(recurse=False)]
        buffers = [b for _, b in module.named_buffers(recurse=False) if b is not None]
        if not params and not buffers:
            continue
        tensors = params or buffers
        found.append(ModulePlacement(
            name, _joined([str(t.device) for t in [*params, *buffers]]),
            _joined([str(t.dtype).removeprefix("torch.") for t in tensors
                     if t.is_floating_point()]),
            sum(p.numel() for p in params if id(p) not in counted), buffers_only=not params))
        counted.update(id(p) for p in params)
    owners = [m for m in found if not m.buffers_only] or found
    device = Counter(m.device for m in owners).most_common(1)[0][0] if owners else "-"
    dtype = Counter(m.dtype for m in owners).most_common(1)[0][0] if owners else "-"
    marked = []
    for m in found:
        why = []
        if m.device != device:
            why.append(f"device {m.device}, not {device}")
        if not m.buffers_only and m.dtype != dtype:
            why.append(f"dtype {m.dtype}, not {dtype}")
        marked.append(ModulePlacement(m.name, m.device, m.dtype, m.params, m.buffers_only,
                                      "; ".join(why)))
    return PlacementMap(tuple(marked), device, dtype)
