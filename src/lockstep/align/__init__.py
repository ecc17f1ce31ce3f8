"""Alignment: which candidate record is compared with which reference record."""

from .pairing import Alignment, Pair, align

__all__ = ["Alignment", "Pair", "align"]
