"""The registry of health checks: one function each, run in this order."""

from __future__ import annotations

from typing import Callable

from .attention import check_attention
from .constant import check_constant
from .ending import check_ending
from .flags import CheckResult
from .layers import check_explode, check_skipped
from .logits import check_logits
from .nonfinite import check_nonfinite
from .reenact import check_attention_output
from .rope import check_rope
from .tokens import check_rows, check_stuck
from .view import DumpView

__all__ = ["CHECKS"]

#: name: check(view) -> CheckResult; adding a check is one function and one line here
CHECKS: dict[str, Callable[[DumpView], CheckResult]] = {
    "ending": check_ending,
    "nonfinite": check_nonfinite,
    "constant": check_constant,
    "attention": check_attention,
    "attention_output": check_attention_output,
    "rope": check_rope,
    "same_rows": check_rows,
    "stuck": check_stuck,
    "skipped_layer": check_skipped,
    "explode": check_explode,
    "logits": check_logits,
}
