"""Forward hooks on a PyTorch module tree: every submodule's output, with no code edits."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable

if TYPE_CHECKING:
    from .recorder import Recorder

__all__ = ["watch_module"]


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix and name else prefix or name


def watch_module(rec: Recorder, root: Any, *, prefix: str, inputs: bool,
                 selected: Callable[[str], bool]) -> Callable[[], None]:
    """Install hooks on ``root`` and its submodules; returns the function that removes them."""
    handles: list[Any] = []

    def output_hook(name: str) -> Callable[..., None]:
        if inputs:
            def hook(module: Any, args: tuple[Any, ...], kwargs: dict[str, Any],
                     output: Any) -> None:
                named = {str(i): a for i, a in enumerate(args)}
                named.update(kwargs)
                rec.capture(name, {"input": named}, role="input")
                rec.capture(name, output, role="output")
        else:
            def hook(module: Any, args: tuple[Any, ...], output: Any) -> None:
                rec.capture(name, output, role="output")
        return hook

    # The root's pre-hook opens the step before any child records; its exit hook runs even
    # when forward raises (always_call), so the step depth never goes stale.
    handles.append(root.register_forward_pre_hook(lambda m, a: rec._root_enter()))
    for name, module in root.named_modules():
        full = _join(prefix, name)
        if selected(full):
            handles.append(module.register_forward_hook(output_hook(full), with_kwargs=inputs))
    handles.append(root.register_forward_hook(lambda m, a, o: rec._root_exit(), always_call=True))

    def remove() -> None:
        for handle in handles:
            handle.remove()

    return remove
