"""Batched runs against one-at-a-time references: the layout a batched dump carries
(``layout``), splitting it into one dump per sequence (``split``), and the per-sequence
comparisons (``result``). numpy only; the engines that run batches are elsewhere."""

from .split import split_batch

__all__ = ["split_batch"]
