"""JSON text both ways: numbers made writable, and JSON from files we did not write.

JSON has no NaN or Infinity: ``json_number`` writes them as the strings "nan", "inf" and
"-inf", and ``json_safe`` does so all through a value (numpy scalars made plain too).

Reading, ``json.loads`` fails on hostile text in more ways than ``JSONDecodeError``: an
integer of 4,301 digits or more (ValueError), nesting deeper than the interpreter's stack
(RecursionError), bytes that are not UTF-8. ``loads`` turns each into ``JSONTextError`` and
also refuses values nested deeper than ``MAX_DEPTH`` (later code that walks or prints them
would recurse as deep).
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from typing import Any, overload

import numpy as np

__all__ = ["JSONTextError", "loads", "MAX_DEPTH", "too_deep", "json_number", "json_safe"]

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


@overload
def json_number(x: float) -> float | str: ...
@overload
def json_number(x: None) -> None: ...
def json_number(x: float | None) -> float | str | None:
    """A float for JSON; NaN and infinities as the strings "nan", "inf", "-inf" (None stays
    None)."""
    if x is None:
        return None
    if math.isnan(x):
        return "nan"
    if math.isinf(x):
        return "inf" if x > 0 else "-inf"
    return x


def json_safe(value: Any) -> Any:
    """``value`` as JSON types, all through: mappings with string keys, lists, plain bools
    and ints (numpy's too), floats through ``json_number``, anything else as ``str``."""
    if isinstance(value, Mapping):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    if isinstance(value, (int, np.integer)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        return json_number(float(value))
    return value if value is None or isinstance(value, str) else str(value)
