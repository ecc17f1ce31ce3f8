"""Forward hooks on a PyTorch module tree: every submodule's output, with no code edits."""

from __future__ import annotations

import fnmatch
from typing import TYPE_CHECKING, Any, Callable, Sequence

if TYPE_CHECKING:
    from .recorder import Recorder

__all__ = ["watch_module"]


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix and name else prefix or name


def watch_module(rec: Recorder, root: Any, *, prefix: str, inputs: bool | Sequence[str],
                 selected: Callable[[str], bool]) -> Callable[[], None]:
    """Install hooks on ``root`` and its submodules; returns the function that removes them.

    ``inputs``: True records every module's inputs, a list of globs those of matching modules.
    """
    handles: list[Any] = []

    def wants_inputs(name: str) -> bool:
        if isinstance(inputs, bool):
            return inputs
        return any(fnmatch.fnmatchcase(name, p) for p in inputs)

    def output_hook(name: str, with_inputs: bool) -> Callable[..., None]:
        def hook_with_inputs(module: Any, args: tuple[Any, ...], kwargs: dict[str, Any],
                             output: Any) -> None:
            named = {str(i): a for i, a in enumerate(args)}
            named.update(kwargs)
            rec.capture(name, {"input": named}, role="input", opens_step=False, strict=False)
            rec.capture(name, output, role="output", opens_step=False, strict=False)

        def hook(module: Any, args: tuple[Any, ...], output: Any) -> None:
            rec.capture(name, output, role="output", opens_step=False, strict=False)

        return hook_with_inputs if with_inputs else hook

    # The root's pre-hook opens the step before any child records; its exit hook runs even
    # when forward raises (always_call), so the step depth never goes stale.
    handles.append(root.register_forward_pre_hook(lambda m, a: rec._root_enter(m)))
    for name, module in root.named_modules():
        full = _join(prefix, name)
        if selected(full):
            with_inputs = wants_inputs(full)
            handles.append(module.register_forward_hook(output_hook(full, with_inputs),
                                                        with_kwargs=with_inputs))
    handles.append(root.register_forward_hook(lambda m, a, o: rec._root_exit(), always_call=True))

    def remove() -> None:
        for handle in handles:
            handle.remove()

    return remove
