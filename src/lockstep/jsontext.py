"""JSON from files we did not write: one exception for every way it can be unreadable.

``json.loads`` fails on hostile text in more ways than ``JSONDecodeError``: an integer of
4,301 digits or more (ValueError), nesting deeper than the interpreter's stack
(RecursionError), bytes that are not UTF-8. ``loads`` turns each into ``JSONTextError`` and
also refuses values nested deeper than ``MAX_DEPTH`` (later code that walks or prints them
would recurse as deep).
"""

from __future__ import annotations

import json
from typing import Any

__all__ = ["JSONTextError", "loads", "MAX_DEPTH", "too_deep"]

MAX_DEPTH = 64  #: arrays/objects inside one another, at most


class JSONTextError(ValueError):
    """Text that is not JSON lockstep can use; the message says why, in a few words."""


def too_deep(value: Any, limit: int = MAX_DEPTH) -> bool:
    """True when ``value`` nests lists/dicts more than ``limit`` deep (iterative: no stack)."""
    if not isinstance(value, (dict, list)):
        return False
    level = [value]
    depth = 0
    while level:
        depth += 1
        if depth > limit:
            return True
        nxt: list[Any] = []
        for item in level:
            children = item.values() if isinstance(item, dict) else item
            nxt.extend(c for c in children if isinstance(c, (dict, list)))
        level = nxt
    return False


def loads(text: str | bytes | bytearray) -> Any:
    """Parse ``text``; raises JSONTextError (a ValueError) whatever is wrong with it."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise JSONTextError(f"not valid JSON ({exc})") from None
    except UnicodeDecodeError as exc:
        raise JSONTextError(f"not UTF-8 ({exc.reason} at byte {exc.start})") from None
    except RecursionError:
        raise JSONTextError(f"nested too deeply (more than {MAX_DEPTH} levels)") from None
    except ValueError as exc:  # an integer too long to convert, and the like
        raise JSONTextError(f"not usable JSON ({str(exc).splitlines()[0][:120]})") from None
    if too_deep(value):
        raise JSONTextError(f"nested too deeply (more than {MAX_DEPTH} levels)")
    return value
