"""lockstep inside an engine's own pytest suite (docs/testing.md).

Loaded by pytest through the ``pytest11`` entry point once lockstep is installed. It gives:

* the ``lockstep`` fixture: ``lockstep.diff(REF, CAND, tokens=..., decode=...)`` records both
  engines and compares them, returning an ``Outcome`` whose ``assert_ok()`` fails the test
  with lockstep's terminal report as the message;
* golden reference dumps: ``lockstep.golden(NAME, REF, tokens=...)`` keeps a small reference
  recording (statistics only by default, or a chosen subset of tensors) under
  ``lockstep-golden/`` beside the suite, made or refreshed with ``--lockstep-update``, and
  returns the ``dump:`` spec to diff against, so CI needs no reference engine;
* a matrix: a test that takes ``lockstep_dtype`` or ``lockstep_backend`` runs once per value
  of ``--lockstep-dtypes`` / ``--lockstep-backends`` (or the ini options of the same names).
"""

from __future__ import annotations

import io
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import pytest

__all__ = ["Lockstep", "Outcome"]

_OK = ("match", "drift")


@dataclass
class Outcome:
    """A comparison made by ``Lockstep.diff``."""

    comparison: Any  #: lockstep.compare.Comparison
    out: Path  #: where both dumps are kept

    @property
    def verdict(self) -> str:
        return str(self.comparison.verdict)

    def report(self, width: int = 100) -> str:
        """lockstep's terminal report, as plain text."""
        from rich.console import Console

        from .report.terminal import ComparisonReport

        console = Console(file=io.StringIO(), width=width, record=True, color_system=None)
        console.print(ComparisonReport(self.comparison, rows=12))
        return console.export_text()

    def assert_ok(self) -> None:
        """Fail the test unless the verdict is match or drift."""
        if self.verdict not in _OK:
            raise AssertionError(f"lockstep: {self.verdict.upper()} (dumps in {self.out})\n"
                                 + self.report())


class Lockstep:
    """The ``lockstep`` fixture's object."""

    def __init__(self, request: pytest.FixtureRequest, tmp_path: Path) -> None:
        self._config = request.config
        self._tmp = tmp_path
        self._count = 0

    def diff(self, reference: str, candidate: str, *, prompt: str | None = None,
             tokens: Sequence[int] | None = None, decode: int = 0,
             ref_options: dict[str, Any] | None = None,
             cand_options: dict[str, Any] | None = None, mapping: str | None = None,
             free_running: bool = False) -> Outcome:
        """Record both engines on the same tokens (the candidate teacher-forced with the
        reference's greedy tokens unless ``free_running``) and compare them."""
        from .align.mapping import load_mapping
        from .workflows.diff import diff

        self._count += 1
        out = self._tmp / f"lockstep-diff-{self._count}"
        result = diff(reference, candidate, out, prompt=prompt, tokens=tokens, decode=decode,
                      free_running=free_running, ref_options=ref_options,
                      cand_options=cand_options,
                      mapping=load_mapping(mapping) if mapping else None)
        return Outcome(result, out)

    def golden_dir(self) -> Path:
        configured = self._config.getini("lockstep_golden_dir")
        return Path(self._config.rootpath) / (configured or "lockstep-golden")

    def golden(self, name: str, reference: str, *, prompt: str | None = None,
               tokens: Sequence[int] | None = None, decode: int = 0,
               stats_only: bool = True, include: Sequence[str] | None = None,
               exclude: Sequence[str] | None = None, layers: Sequence[int] | None = None,
               options: dict[str, Any] | None = None) -> str:
        """The ``dump:`` spec of the golden reference recording ``NAME``: made (or remade)
        when pytest runs with ``--lockstep-update``; a missing one fails the test and says
        how to make it. Statistics only by default (a few kilobytes); ``include`` keeps
        only the records whose names match these globs, ``exclude`` drops those matching
        these, ``layers`` keeps only these layers' records (and those of no layer)."""
        from .workflows.capture import capture

        path = self.golden_dir() / f"{name}.lsd"
        if self._config.getoption("lockstep_update"):
            tmp = path.with_name(path.name + ".new")
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.parent.mkdir(parents=True, exist_ok=True)
            capture(reference, str(tmp), prompt=prompt, tokens=tokens, decode=decode,
                    data=not stats_only, include=include, exclude=exclude, layers=layers,
                    **(options or {}))
            shutil.rmtree(path, ignore_errors=True)
            tmp.rename(path)
        elif not (path / "index.jsonl").is_file():
            pytest.fail(f"lockstep: the golden dump {path} does not exist; record it with "
                        "pytest --lockstep-update", pytrace=False)
        return f"dump:{path}"


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("lockstep")
    group.addoption("--lockstep-update", action="store_true", default=False,
                    help="record (again) every golden dump the tests ask for")
    group.addoption("--lockstep-dtypes", default=None,
                    help="comma-separated dtypes for tests taking lockstep_dtype")
    group.addoption("--lockstep-backends", default=None,
                    help="comma-separated backends for tests taking lockstep_backend")
    parser.addini("lockstep_golden_dir", "where golden dumps live (default lockstep-golden, "
                  "relative to the rootdir)", default="")
    parser.addini("lockstep_dtypes", "dtypes for lockstep_dtype (default float32)",
                  default="float32")
    parser.addini("lockstep_backends", "backends for lockstep_backend (default cpu)",
                  default="cpu")


def _values(config: pytest.Config, name: str) -> list[str]:
    raw = config.getoption(f"lockstep_{name}") or config.getini(f"lockstep_{name}")
    return [v.strip() for v in str(raw).split(",") if v.strip()]


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    for name in ("dtypes", "backends"):
        arg = f"lockstep_{name[:-1]}"
        if arg in metafunc.fixturenames:
            metafunc.parametrize(arg, _values(metafunc.config, name))


@pytest.fixture
def lockstep(request: pytest.FixtureRequest, tmp_path: Path) -> Lockstep:
    """Run lockstep diffs and golden comparisons from a test (see ``Lockstep``)."""
    return Lockstep(request, tmp_path)
