"""What op a recorded name stands for (``Role``): the canonical name a name table gives it,
else a guess from the words engines commonly use (``kinds.guess``). Pairing, the
comparison's coverage and diagnoses, and the health checks all read roles from here."""

from __future__ import annotations

from dataclasses import dataclass

from . import kinds
from .kinds import Kind
from .tables import table_canonical

__all__ = ["Role", "role_of_name", "role_of_canonical", "table_role"]


@dataclass(frozen=True)
class Role:
    """What op a record holds: its layer (None outside the layers) and canonical op name."""

    layer: int | None
    op: str  #: "q", "q_rope", "attn_heads", "logits", ...; "" when unknown


def role_of_canonical(canonical: str) -> Role:
    """The role a canonical name (``layers.3.q_rope``) stands for."""
    parts = kinds.parse(canonical)
    if parts is None:  # a name no Kind stands for (a newer version's): as it reads
        return Role(*kinds.split_layer(canonical))
    if parts.kind is Kind.TOK_EMBED and not parts.scope:
        return Role(parts.layer, Kind.EMBED)
    return Role(parts.layer, parts.op)


def _guess(name: str) -> Role:
    """The op a recorded name stands for when no name table knows it (align.kinds.guess)."""
    layer, kind = kinds.guess(name)
    return Role(layer, kind or "")


def table_role(name: str) -> Role | None:
    """The role the first name table that knows ``name`` gives it, or None."""
    canonical = table_canonical(name)
    return None if canonical is None else role_of_canonical(canonical)


def role_of_name(name: str) -> Role:
    """The op one recorded name stands for: a name table's, else a guess."""
    return table_role(name) or _guess(name)
