"""lockstep: run an inference engine beside a trusted reference and find where they part.

The public API (docs/api.md): recording (``record``, ``probe``, ``Recorder``), dumps
(``open_dump``, ``Dump``), comparison (``compare``, ``Comparison``, ``Tolerances``), the
workflows that run engines (``diff``; ``lockstep.workflows.capture``), the generation check
(``check_generation``, ``Prompt``), the checkpoint doctor (``inspect_checkpoint``,
``against_checkpoints``, ``check_loaded``, ``LoadCheck``), engines (``open_engine``) and the
errors (``LockstepError``, ``DumpError``, ``UsageError``). The names that need the workflows'
modules are loaded on first use, so ``import lockstep`` (and ``lockstep.probe`` in an engine)
stays light.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from ._version import __version__
from .capture import Recorder, probe, record
from .checkpoint.weights import LoadCheck, check_loaded
from .compare import Comparison, Tolerances, compare
from .errors import DumpError, LockstepError, UsageError
from .store import Dump, open_dump

if TYPE_CHECKING:
    from .checkpoint import against_checkpoints, inspect_checkpoint
    from .engines import open_engine
    from .generation import Prompt, check_generation
    from .workflows.diff import diff

__all__ = ["__version__", "record", "probe", "Recorder", "open_dump", "Dump", "compare",
           "Comparison", "Tolerances", "diff", "check_generation", "Prompt",
           "inspect_checkpoint", "against_checkpoints", "check_loaded", "LoadCheck",
           "open_engine", "LockstepError", "DumpError", "UsageError"]

#: name -> the module it is loaded from on first use
_LAZY = {"diff": "lockstep.workflows.diff", "check_generation": "lockstep.generation",
         "Prompt": "lockstep.generation", "inspect_checkpoint": "lockstep.checkpoint",
         "against_checkpoints": "lockstep.checkpoint", "open_engine": "lockstep.engines"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'lockstep' has no attribute {name!r}")
