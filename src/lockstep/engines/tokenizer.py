"""Engines whose tokenizer is a transformers tokenizer: tokenize, chat template, decode."""

from __future__ import annotations

from typing import Any, Sequence

from ..errors import UsageError
from .base import Engine

__all__ = ["TransformersTokenizerEngine"]


class TransformersTokenizerEngine(Engine):
    """An engine that keeps a transformers tokenizer in ``self.tokenizer`` (None when the
    model has no tokenizer files: token ids can still be given directly)."""

    tokenizer: Any = None

    def tokenize(self, text: str) -> list[int]:
        if self.tokenizer is None:
            raise UsageError(f"{self.spec} has no tokenizer files; give token ids with "
                             "--tokens 1,2,3 instead of --prompt")
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def chat_tokens(self, messages: list[dict[str, str]]) -> list[int]:
        if self.tokenizer is None:
            raise UsageError(f"{self.spec} has no tokenizer files, so no chat template")
        if not getattr(self.tokenizer, "chat_template", None):
            raise UsageError(f"{self.spec}: the tokenizer has no chat template; give plain "
                             "prompts (no --chat, no \"messages\")")
        out = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True,
                                                 tokenize=True)
        ids = out["input_ids"] if hasattr(out, "keys") else out  # a BatchEncoding in v5
        return [int(i) for i in ids]

    def detokenize(self, ids: Sequence[int], *, skip_special: bool = False) -> str | None:
        if self.tokenizer is None:
            return None
        return str(self.tokenizer.decode(list(ids), skip_special_tokens=skip_special))
