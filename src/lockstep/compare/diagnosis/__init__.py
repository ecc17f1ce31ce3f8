"""The diagnosis: what kind of problem the first divergence is, and what to check.

Read from the dumps themselves, beside the first divergence: a handful of tensors (the pair
that diverged, its inputs, the same tensor at the previous step) and the errors every pair
already has, through a ``case.Case`` and the numpy tests of ``evidence``.

- ``model``: ``Diagnosis``, ``Rule`` and ``make``;
- one module per rule (``nan``, ``zeros``, ..., ``op``), each a ``@rule(kind)`` function;
- ``registry``: ``RULES``, the rules in the order they run, and ``KINDS``;
- ``run``: ``diagnose(case, rules=RULES)``, and ``diagnose_safely``, which never costs the
  comparison.
"""

from .model import Diagnosis, Rule, make, rule
from .registry import KINDS, RULES
from .run import diagnose, diagnose_safely

__all__ = ["Diagnosis", "Rule", "KINDS", "RULES", "diagnose", "diagnose_safely", "make",
           "rule"]
