"""Prompts for the generation check: text, chat messages or token ids, one file of them.

A prompts file is plain text, one prompt per line (blank lines skipped), or, when its name
ends in ``.jsonl``, one JSON object per line: ``{"prompt": "..."}``, ``{"messages": [{"role":
"user", "content": "..."}, ...]}`` (the reference's chat template is applied) or
``{"tokens": [1, 2, 3]}``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

from ..errors import UsageError

__all__ = ["Prompt", "as_prompts", "load_prompts"]


@dataclass(frozen=True)
class Prompt:
    """One prompt: exactly one of ``text``, ``messages`` or ``tokens``."""

    text: str | None = None
    messages: tuple[Mapping[str, str], ...] | None = None  #: chat turns, for the chat template
    tokens: tuple[int, ...] | None = None  #: token ids, fed as they are
    chat: bool = False  #: wrap ``text`` as one user turn and apply the chat template

    def __post_init__(self) -> None:
        given = [x for x in (self.text, self.messages, self.tokens) if x is not None]
        if len(given) != 1:
            raise UsageError("a prompt is text, chat messages or token ids: give exactly one")

    @property
    def label(self) -> str:
        """A one-line description for reports."""
        if self.text is not None:
            return self.text
        if self.messages is not None:
            return str(self.messages[-1].get("content", "")) if self.messages else ""
        return "tokens " + ",".join(map(str, self.tokens or ()))

    def chat_messages(self) -> list[dict[str, str]] | None:
        """The messages the chat template gets, or None when it is not applied."""
        if self.messages is not None:
            return [dict(m) for m in self.messages]
        if self.chat and self.text is not None:
            return [{"role": "user", "content": self.text}]
        return None

    def as_dict(self) -> dict[str, Any]:
        """The prompt as the JSON report writes it."""
        if self.messages is not None:
            return {"messages": [dict(m) for m in self.messages]}
        if self.tokens is not None:
            return {"tokens": list(self.tokens)}
        return {"prompt": self.text, "chat": self.chat}


def _messages(value: Any, where: str) -> tuple[Mapping[str, str], ...]:
    if not isinstance(value, list) or not value:
        raise UsageError(f"{where}: \"messages\" must be a non-empty list of "
                         "{\"role\": ..., \"content\": ...} objects")
    for m in value:
        if not (isinstance(m, dict) and isinstance(m.get("role"), str)
                and isinstance(m.get("content"), str)):
            raise UsageError(f"{where}: each message needs a string \"role\" and a string "
                             f"\"content\", got {json.dumps(m)[:80]}")
    return tuple(dict(m) for m in value)


def _from_json(line: str, where: str, chat: bool) -> Prompt:
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as exc:
        raise UsageError(f"{where}: not valid JSON ({exc.msg} at column {exc.colno})") from None
    if not isinstance(obj, dict):
        raise UsageError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    if isinstance(obj.get("prompt"), str):
        return Prompt(text=obj["prompt"], chat=chat)
    if "messages" in obj:
        return Prompt(messages=_messages(obj["messages"], where))
    tokens = obj.get("tokens")
    if isinstance(tokens, list) and tokens and all(isinstance(t, int) for t in tokens):
        return Prompt(tokens=tuple(tokens))
    raise UsageError(f"{where}: expected {{\"prompt\": \"text\"}}, {{\"messages\": [...]}} or "
                     f"{{\"tokens\": [ids]}}, got keys {sorted(obj)}")


def load_prompts(path: str | Path, *, chat: bool = False) -> list[Prompt]:
    """Read a prompts file (text lines or JSONL, by its name); ``chat`` applies the chat
    template to text prompts too."""
    p = Path(path)
    if not p.is_file():
        raise UsageError(f"prompts file {p} does not exist" if not p.exists()
                         else f"prompts file {p} is not a file")
    try:
        lines = p.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as exc:
        raise UsageError(f"prompts file {p} is not UTF-8 text (byte {exc.start})") from None
    jsonl = p.suffix.lower() in (".jsonl", ".ndjson")
    prompts = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        if jsonl:
            prompts.append(_from_json(line, f"{p} line {number}", chat))
        else:
            prompts.append(Prompt(text=line, chat=chat))
    if not prompts:
        raise UsageError(f"prompts file {p} has no prompts (it is empty or every line is "
                         "blank); write one prompt per line")
    return prompts


def as_prompts(items: Sequence[Prompt | str]) -> list[Prompt]:
    """Prompts from a mix of ``Prompt`` objects and plain strings."""
    out = [item if isinstance(item, Prompt) else Prompt(text=str(item)) for item in items]
    if not out:
        raise UsageError("no prompts given")
    return out
