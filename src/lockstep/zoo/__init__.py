"""The bug zoo: a mini Llama/Qwen3 inference engine with switchable, documented bugs.

An example candidate engine for lockstep (docs/zoo.md): pure PyTorch, a paged KV cache,
prefill and decode, an optional blocked decode VM, and one registry entry (``BUGS``) per bug
it can switch on, with the step, tensor and diagnosis lockstep should report. Importing this
package needs no torch; loading the engine does.
"""

from __future__ import annotations

from .bugs import BUGS, DIAGNOSES, Bug
from .engine import ZooEngine

__all__ = ["BUGS", "DIAGNOSES", "Bug", "ZooEngine"]
