"""This process's peak memory: resident set size, and on CUDA the most torch allocated."""

from __future__ import annotations

import sys
from typing import Any

__all__ = ["peak_memory"]


def peak_memory() -> dict[str, Any]:
    """``rss_bytes``: the process's peak resident set (None where the OS does not say);
    ``cuda_max_allocated_bytes``: torch's peak CUDA allocation, when CUDA was used."""
    rss = None
    try:
        import resource

        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        rss = int(peak) * (1 if sys.platform == "darwin" else 1024)  # bytes there, KiB here
    except (ImportError, OSError):
        pass
    cuda = None
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available() and torch.cuda.is_initialized():
        cuda = int(torch.cuda.max_memory_allocated())
    return {"rss_bytes": rss, "cuda_max_allocated_bytes": cuda}
