"""Which records a recording keeps: glob patterns on names, and a set of layers.

A name's layer is the first delimited integer in it (``model.layers.3.mlp``: 3,
``blk.12.attn_q``: 12, ``ffn_out-7``: 7), as the aligner reads it (align.structure); a
name with none (``model.embed_tokens``, ``:logits``, ``input_ids``) belongs to no layer
and is kept by a layer selection.
"""

from __future__ import annotations

import fnmatch
from typing import Iterable, Sequence

from ..align.structure import layer_of
from ..errors import UsageError

__all__ = ["Selection", "parse_layers"]


class Selection:
    """Include/exclude glob patterns on recorded names (fnmatch syntax) and layers to keep."""

    def __init__(self, include: Sequence[str] | None, exclude: Sequence[str] | None,
                 layers: Iterable[int] | None = None) -> None:
        self.include = list(include or [])
        self.exclude = list(exclude or [])
        self.layers = None if layers is None else frozenset(int(i) for i in layers)

    @property
    def selective(self) -> bool:
        """Some name can be left out (else every name is kept)."""
        return bool(self.include or self.exclude or self.layers is not None)

    def __call__(self, name: str) -> bool:
        if self.include and not any(fnmatch.fnmatchcase(name, p) for p in self.include):
            return False
        if any(fnmatch.fnmatchcase(name, p) for p in self.exclude):
            return False
        if self.layers is None:
            return True
        layer, _ = layer_of(name)
        return layer is None or layer in self.layers


def parse_layers(text: str) -> list[int]:
    """``"0-3,10"`` -> [0, 1, 2, 3, 10]; a malformed list is a UsageError."""
    out: set[int] = set()
    for part in text.split(","):
        part = part.strip()
        lo, dash, hi = part.partition("-")
        try:
            first, last = int(lo), int(hi) if dash else int(lo)
        except ValueError:
            raise UsageError(f"--layers {text!r}: expected layer numbers and ranges such as "
                             "0-3,10") from None
        if first < 0 or last < first:
            raise UsageError(f"--layers {text!r}: {part!r} is not a range of layers "
                             "(0 or more, low-high)")
        out.update(range(first, last + 1))
    return sorted(out)
