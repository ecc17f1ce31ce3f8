"""Optional dependencies (torch, transformers, llama.cpp, gguf), imported when first needed.

``require("torch", "hf")`` returns the module, or raises MissingExtraError, which tells the
user the ``pip install 'lockstep[EXTRA]'`` line that installs it.
"""

from __future__ import annotations

import importlib
from typing import Any

from .errors import MissingExtraError

__all__ = ["require"]


def require(module: str, extra: str) -> Any:
    """The module ``module``; MissingExtraError naming ``extra`` when it is not installed."""
    try:
        return importlib.import_module(module)
    except ImportError:
        raise MissingExtraError(module, extra) from None
