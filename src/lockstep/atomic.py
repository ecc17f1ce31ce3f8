"""Files lockstep writes for the user (reports, mappings), written atomically.

The text goes to ``PATH.tmp`` beside the file and is renamed over it, so a reader never
sees half a file; an error names the file the user asked for, not the temporary one.
"""

from __future__ import annotations

import json
import os
from typing import Any

__all__ = ["write_text_file", "write_json_file"]


def write_text_file(text: str, path: str | os.PathLike[str]) -> None:
    """Write ``text`` (UTF-8) to ``path`` atomically; OSError names ``path``."""
    tmp = f"{os.fspath(path)}.tmp"
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
    except OSError as exc:
        raise OSError(exc.errno, exc.strerror, os.fspath(path)) from None


def write_json_file(obj: Any, path: str | os.PathLike[str]) -> None:
    """Write a JSON value atomically: indented one space, a newline at the end, values JSON
    does not know written with ``str``."""
    write_text_file(json.dumps(obj, indent=1, default=str) + "\n", path)
