"""Dumps written the way SGLang's dumper (``sglang.srt.debug_utils.dumper``) writes them, for
the import tests: its non-intrusive mode "all" on a module tree, one ``torch.save``'d file per
tensor in ``DIR/EXP_NAME/``, named by its tags joined with ``___``.

Current format: ``step=S___rank=R___dump_index=I___name=N___recompute_status=disabled.pt``
holding ``{"value": tensor, "meta": {...tags, "world_rank": R, "world_size": W}}``; module
outputs named ``non_intrusive__<module>.output`` (``.output.K`` for the K-th tensor of a
tuple of several), the root's first two arguments as the forward batch's ``input_ids`` and
``positions``. ``legacy=True``: the older format, ``forward_pass_id=S___rank=R___name=N___
dump_index=I.pt`` holding the tensor alone. SGLang calls ``dumper.step()`` once per
iteration; here each call of the root after the first is a new step, so that logits
computed outside the root's forward (vLLM's and SGLang's ``compute_logits``) stay in the
step of the forward they follow.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch


class SGLangStyleDumper:
    def __init__(self, directory: Path, *, rank: int = 0, world_size: int = 1,
                 legacy: bool = False, exp_name: str = "dump_20251201_120000_000000") -> None:
        self.dir = Path(directory) / exp_name
        self.dir.mkdir(parents=True, exist_ok=True)
        self.rank, self.world_size, self.legacy = rank, world_size, legacy
        self.step = 0
        self.index = 0
        self._calls = 0
        self._handles: list[Any] = []

    def dump(self, name: str, value: torch.Tensor, meta: dict[str, Any] | None = None,
             **tags: Any) -> None:
        """One file; ``tags`` go into its name and meta, ``meta`` (``dims``) into its meta."""
        self.index += 1
        if self.legacy:
            fields = {"forward_pass_id": self.step, "rank": self.rank, "name": name,
                      "dump_index": self.index}
            torch.save(value.detach().clone(), self.dir / self._file(fields))
            return
        fields = {"step": self.step, "rank": self.rank, "dump_index": self.index,
                  "name": name, "recompute_status": "disabled", **tags}
        saved = {**fields, "world_rank": self.rank, "world_size": self.world_size, **(meta or {})}
        torch.save({"value": value.detach().clone(), "meta": saved}, self.dir / self._file(fields))

    @staticmethod
    def _file(fields: dict[str, Any]) -> str:
        return "___".join(f"{k}={v}" for k, v in fields.items()) + ".pt"

    def watch(self, model: torch.nn.Module) -> None:
        """Hooks on every module, as the non-intrusive dumper in mode "all" registers them."""
        def root_pre(module: Any, args: tuple[Any, ...]) -> None:
            if self._calls:
                self.step += 1
            self._calls += 1
            for name, value in zip(("input_ids", "positions"), args):
                if isinstance(value, torch.Tensor):
                    self.dump(name, value)

        def output_hook(name: str) -> Any:
            def hook(module: Any, args: Any, output: Any) -> None:
                tensors = [output] if isinstance(output, torch.Tensor) else [
                    t for t in (output if isinstance(output, (tuple, list)) else ())
                    if isinstance(t, torch.Tensor)]
                parts = [name] if name else []
                if len(tensors) == 1:
                    self.dump("non_intrusive__" + ".".join(parts + ["output"]), tensors[0])
                else:
                    for i, t in enumerate(tensors):
                        self.dump("non_intrusive__" + ".".join(parts + ["output", str(i)]), t)
            return hook

        self._handles.append(model.register_forward_pre_hook(root_pre))
        for name, module in model.named_modules():
            self._handles.append(module.register_forward_hook(output_hook(name)))

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
