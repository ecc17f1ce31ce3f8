"""Recording q and k after RoPE in a transformers model, where RoPE is a function, not a module.

transformers' attention layers call their modeling module's ``apply_rotary_pos_emb(q, k, cos,
sin)``. While recording, that function is wrapped so that its outputs are captured as
``<attention module>.rope:0`` (q) and ``:1`` (k), named after the attention module that called
it (known from a forward pre-hook), in transformers' (batch, heads, tokens, head_dim) layout.
"""

from __future__ import annotations

import sys
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, Iterator

if TYPE_CHECKING:
    from ..capture.surface import RecorderSurface

__all__ = ["watch_rope"]

_FUNCTION = "apply_rotary_pos_emb"


def _attention_modules(model: Any) -> list[tuple[str, Any]]:
    return [(name, m) for name, m in model.named_modules()
            if name.endswith(("self_attn", ".attn", ".attention")) and hasattr(m, "forward")]


@contextmanager
def watch_rope(rec: RecorderSurface, model: Any) -> Iterator[bool]:
    """Capture q/k after RoPE for the duration; yields False when the model has no such
    function (nothing is recorded then). The patch and hooks are undone on leaving, or by
    the recording's close (``Recorder.add_undo``) if that comes first."""
    modeling = sys.modules.get(type(model).__module__)
    original = getattr(modeling, _FUNCTION, None)
    if original is None:
        yield False
        return
    current: list[str] = []

    def wrapped(*args: Any, **kwargs: Any) -> Any:
        out = original(*args, **kwargs)
        if current and rec.wants(f"{current[-1]}.rope"):  # the recording's selection
            rec.capture(f"{current[-1]}.rope", out)
        return out

    def leave(*_: Any) -> None:  # a forward hook returning a value would replace the output
        current.pop()

    handles: list[Any] = []

    def restore() -> None:
        setattr(modeling, _FUNCTION, original)
        for handle in handles:
            handle.remove()

    # on the recorder's undo list, so that the recording's close undoes it whatever happens
    undo = rec.add_undo(restore)
    for name, module in _attention_modules(model):
        handles.append(module.register_forward_pre_hook(
            lambda _m, _a, name=name: current.append(name)))
        handles.append(module.register_forward_hook(leave))
    setattr(modeling, _FUNCTION, wrapped)
    try:
        yield True
    finally:
        undo()
