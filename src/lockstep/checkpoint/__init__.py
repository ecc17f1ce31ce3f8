"""The checkpoint doctor: read a model's weights tensor by tensor and say what is wrong.

``inspect_checkpoint(path)`` reads a safetensors file, a directory of shards, a PEFT adapter
directory, a GGUF file or a PyTorch ``.bin``/``.pt`` and returns per-tensor statistics
grouped by component (embeddings, attention, mlp, ...); a tensor holding any NaN or Inf is bad.
``against_checkpoints(a, b)`` pairs two checkpoints' tensors (layouts undone) and
``check_loaded(model, path)`` a live model's parameters with its checkpoint's.
"""

from __future__ import annotations

from .against import AgainstReport, against_checkpoints
from .components import DEFAULT_RULES, ComponentRules
from .errors import CheckpointError
from .inspection import InspectReport, inspect_checkpoint
from .placement import PlacementMap, placement_map
from .tensors import TensorReport
from .weights import LoadCheck, check_loaded

__all__ = ["inspect_checkpoint", "InspectReport", "TensorReport", "CheckpointError",
           "ComponentRules", "DEFAULT_RULES", "against_checkpoints", "AgainstReport",
           "check_loaded", "LoadCheck", "placement_map", "PlacementMap"]
