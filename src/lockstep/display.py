"""Text from a dump or a checkpoint, made safe to print: it is data, never markup.

Names and metadata come from files anyone can write. rich would read ``[bold]`` in them as
markup (``[/]`` even raises), a lone surrogate (valid JSON: ``"\\ud800"``) cannot be encoded
for the terminal, and control characters (an ANSI escape) would act on it. ``safe`` escapes
what cannot be shown; ``text`` wraps the result in a rich ``Text``, which is never parsed.
"""

from __future__ import annotations

from typing import Any

__all__ = ["safe", "text"]


def _escape(ch: str) -> str:
    return ch if ch.isprintable() or ch == " " else ch.encode("unicode_escape").decode("ascii")


def safe(value: Any, limit: int | None = None) -> str:
    """``str(value)`` with surrogates and control characters escaped (``\\ud800``,
    ``\\x1b``), cut to ``limit`` characters when given."""
    try:
        s = value if isinstance(value, str) else str(value)
    except (ValueError, RecursionError):  # an int too long to print, nesting too deep
        s = f"<{type(value).__name__} too large to show>"
    if limit is not None and len(s) > limit:
        s = s[:limit - 3] + "..."
    return s if s.isprintable() else "".join(map(_escape, s))


def text(value: Any, style: str = "", limit: int | None = None) -> Any:
    """A rich ``Text`` of ``safe(value)``: printed as it is, never parsed as markup."""
    from rich.text import Text

    return Text(safe(value, limit), style=style)
