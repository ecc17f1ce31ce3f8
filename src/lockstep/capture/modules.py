"""Forward hooks on a PyTorch module tree: every submodule's output, with no code edits."""

from __future__ import annotations

import fnmatch
from typing import TYPE_CHECKING, Any, Callable, Sequence

from .eager import eager

if TYPE_CHECKING:
    from .surface import RecorderSurface, Step

__all__ = ["watch_module"]


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix and name else prefix or name


def _compiled_wrapper(module: Any) -> bool:
    """``torch.compile(module)``'s wrapper (an OptimizedModule), whose ``_orig_mod`` is the
    module itself."""
    return type(module).__name__ == "OptimizedModule" and hasattr(module, "_orig_mod")


def _plain(name: str) -> str:
    """A module's name without the ``_orig_mod`` steps torch.compile's wrappers put in it:
    a compiled model records under the names it has uncompiled."""
    if "_orig_mod" not in name:
        return name
    return ".".join(part for part in name.split(".") if part != "_orig_mod")


def watch_module(rec: RecorderSurface, root: Any, *, prefix: str, inputs: bool | Sequence[str],
                 selected: Callable[[str], bool] | None,
                 called: bool = False) -> Callable[[], None]:
    """Install hooks on ``root`` and its submodules; returns the function that removes them.

    ``inputs``: True records every module's inputs, a list of globs those of matching modules.
    ``selected``: which modules' names are recorded (None: every module's).
    Each call of ``root`` is a step scope (``rec.step(root=root)``). ``called``: ``root`` is
    being called now, past its pre-hooks: this call's step is entered here.
    """
    handles: list[Any] = []
    scopes: list[Step] = []  # the step scopes of the root's calls now running

    def wants_inputs(name: str) -> bool:
        if isinstance(inputs, bool):
            return inputs
        return any(fnmatch.fnmatchcase(name, p) for p in inputs)

    names: dict[int, str] = {}  # id of each watched module -> the name it records under

    # One hook for every module, which finds the module's name by its identity: a closure
    # per module cost a watch of SmolLM2 (397 modules) several milliseconds.
    @eager
    def hook(module: Any, args: tuple[Any, ...], output: Any) -> None:
        rec.capture_output(names[id(module)], output)

    @eager
    def hook_with_inputs(module: Any, args: tuple[Any, ...], kwargs: dict[str, Any],
                         output: Any) -> None:
        name = names[id(module)]
        named = {str(i): a for i, a in enumerate(args)}
        named.update(kwargs)
        rec.capture(name, {"input": named}, role="input", opens_step=False, strict=False)
        rec.capture(name, output, role="output", opens_step=False, strict=False)

    @eager
    def enter(module: Any, args: Any = None) -> None:
        scopes.append(rec.step(root=module).__enter__())

    @eager
    def leave(module: Any, args: Any, output: Any) -> None:
        if scopes:
            scopes.pop().__exit__(None, None, None)

    # The root's pre-hook enters the step before any child records; its exit hook runs even
    # when forward raises (always_call), so no step scope is left open.
    handles.append(root.register_forward_pre_hook(enter))
    for name, module in root.named_modules():
        if _compiled_wrapper(module):
            continue  # its inner module records the same output, under the plain name
        full = _join(prefix, _plain(name))
        if selected is None or selected(full):
            with_inputs = inputs is True or (inputs is not False and wants_inputs(full))
            names[id(module)] = full
            handles.append(module.register_forward_hook(hook_with_inputs if with_inputs
                                                        else hook, with_kwargs=with_inputs))
    handles.append(root.register_forward_hook(leave, always_call=True))
    if called:
        enter(root)

    def remove() -> None:
        for handle in handles:
            handle.remove()

    return remove
