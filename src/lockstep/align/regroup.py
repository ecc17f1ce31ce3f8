"""The steps of two dumps regrouped along their tokens before the steps are matched: a step
cut where the other side began its prefill after a cached prefix (align.prefix), then the
chunks of a prefill fed in several forwards joined (align.chunks)."""

from __future__ import annotations

from ..store.reader import Dump
from .chunks import Chunking, join_chunks
from .prefix import PrefixCut, cut_prefixes

__all__ = ["regroup"]


def regroup(ref: Dump, cand: Dump) -> tuple[Dump, Dump, tuple[PrefixCut, ...],
                                             tuple[Chunking, ...]]:
    """Both sides as compared: cut, then joined. The views share the dumps' mappings: close
    the dumps, not them."""
    ref, cand, cuts = cut_prefixes(ref, cand)
    ref, cand, chunked = join_chunks(ref, cand)
    return ref, cand, cuts, chunked
