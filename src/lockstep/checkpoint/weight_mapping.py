"""A mapping file (docs/mapping.md) read for weights: ``lockstep weights`` and
``inspect --against`` with ``--mapping``.

A rule's ``cand`` matches a tensor name of the model (``weights``) or of the first checkpoint
(``inspect A --against B``); its ``ref`` template is the name the tensor has in the checkpoint
it is checked against. ``ignore`` globs leave tensors out (``cand`` globs on the model's or
A's names, ``ref`` globs on the checkpoint's). Layouts are found by measuring (a transpose,
the Q/K row order), so a rule's transforms are refused rather than silently unused.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable

from ..errors import UsageError

if TYPE_CHECKING:
    from ..align.mapping import MappingFile

__all__ = ["Rename", "weight_renamer"]

#: (tensor name, side "cand" or "ref") -> the name to pair it by, or None to leave it out
Rename = Callable[[str, str], "str | None"]


def weight_renamer(mapping: MappingFile) -> Rename:
    """The renaming a mapping file gives weight names; UsageError for a rule with a
    transform."""
    for rule in mapping.rules:
        if rule.transform or rule.ref_transform:
            raise UsageError(f"{mapping.where(rule.index)}: a transform in a mapping for "
                             "weights is not used (layouts are found by their values); "
                             "remove it")

    def rename(name: str, side: str) -> str | None:
        if mapping.ignored(name, side):
            return None
        if side == "cand":
            hits = mapping.lookup(name)
            if hits:
                return hits[0].ref_name
        return name

    return rename
