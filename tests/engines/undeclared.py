"""The zoo's engine with its precision left out of its metadata, as many users' engines
leave it: ``py:tests/engines/undeclared.py:Undeclared`` with options ``model=DIR`` and
``bug=NAME``. It computes in float32."""

from __future__ import annotations

from typing import Any

from lockstep.zoo.engine import ZooEngine


class Undeclared(ZooEngine):
    name = "undeclared-precision-engine"

    def __init__(self, spec: str, *, model: str, bug: str | None = None) -> None:
        super().__init__(spec, model, bug=bug)

    def meta(self) -> dict[str, Any]:
        meta = super().meta()
        for key in ("dtype", "compute_dtype"):
            meta.pop(key, None)
        return meta
