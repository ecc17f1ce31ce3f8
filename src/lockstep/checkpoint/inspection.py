"""The inspection itself: every tensor's statistics, grouped by component."""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

from ..atomic import write_json_file
from .components import COMPONENTS, ComponentRules, adapter_of
from .errors import UnreadableTensor
from .sources import open_checkpoint
from .tensors import TensorReport, chunked_stats, scaled_counts

__all__ = ["InspectReport", "inspect_checkpoint"]

#: progress(done_tensors, total_tensors, done_bytes, total_bytes)
Progress = Callable[[int, int, int, int], None]


@dataclass
class InspectReport:
    path: str
    kind: str
    tensors: list[TensorReport]
    metadata: dict[str, Any] = field(default_factory=dict)
    adapter: dict[str, Any] | None = None
    bytes_read: int = 0

    @property
    def bad(self) -> list[TensorReport]:
        return [t for t in self.tensors if t.bad]

    @property
    def unreadable(self) -> list[TensorReport]:
        return [t for t in self.tensors if t.unreadable is not None]

    def components(self) -> list[dict[str, Any]]:
        """One row per component present (and per LoRA matrix, ``adapter``, for an adapter's
        tensors): tensors, elements, bad tensors, NaN and Inf counts."""
        rows: dict[tuple[str, str], dict[str, Any]] = OrderedDict()
        for t in self.tensors:
            key = (t.component, t.adapter or "")
            row = rows.setdefault(key, {"component": t.component, "tensors": 0,
                                        "elements": 0, "bad_tensors": 0, "nan": 0, "inf": 0})
            if t.adapter:
                row["adapter"] = t.adapter
            row["tensors"] += 1
            row["elements"] += t.elements
            row["bad_tensors"] += int(t.bad)
            row["nan"] += int(t.stats.get("nan") or 0)
            row["inf"] += int(t.stats.get("inf") or 0)
        order = {c: i for i, c in enumerate(COMPONENTS)}
        return sorted(rows.values(), key=lambda r: (order.get(r["component"], -1),
                                                    r["component"], r.get("adapter", "")))

    def to_json(self) -> dict[str, Any]:
        return {
            "path": self.path, "kind": self.kind, "metadata": self.metadata,
            "adapter": self.adapter,
            "summary": {"tensors": len(self.tensors),
                        "elements": sum(t.elements for t in self.tensors),
                        "bad_tensors": len(self.bad), "bytes": self.bytes_read},
            "components": self.components(),
            "bad_tensors": [{"name": t.name, "component": t.component, "nan": t.stats["nan"],
                             "inf": t.stats["inf"]} for t in self.bad],
            "unreadable_tensors": [{"name": t.name, "dtype": t.dtype, "why": t.unreadable}
                                   for t in self.unreadable],
            "tensors": [t.to_json() for t in self.tensors],
        }

    def write_json(self, path: str | Path, **extra: Any) -> None:
        """The report as JSON, with ``extra`` keys added."""
        write_json_file({**self.to_json(), **extra}, path)


def inspect_checkpoint(path: str | Path, *, groups: Iterable[str | tuple[str, str]] = (),
                       progress: Progress | None = None) -> InspectReport:
    """Read every tensor at ``path`` once, tensor by tensor, and report its statistics.

    ``groups`` are extra ``REGEX=COMPONENT`` rules tried before the defaults.
    Raises CheckpointError (a LockstepError) for a missing, corrupt or truncated checkpoint.
    """
    rules = ComponentRules.build(groups)
    ckpt = open_checkpoint(path)
    sources = list(ckpt.tensors())
    total_bytes = sum(s.nbytes for s in sources)
    done_bytes = 0
    reports = []
    for i, src in enumerate(sources):
        try:
            stats, why = scaled_counts(chunked_stats(src.chunks()), src.repeat), None
        except UnreadableTensor as exc:  # reported, and the others are read
            stats, why = {}, exc.reason
        reports.append(TensorReport(src.name, src.dtype, src.shape, rules.component(src.name),
                                    stats, why, adapter_of(src.name)))
        done_bytes += src.nbytes
        if progress is not None:
            progress(i + 1, len(sources), done_bytes, total_bytes)
    return InspectReport(str(ckpt.path), ckpt.kind, reports, ckpt.metadata, ckpt.adapter,
                         done_bytes)
