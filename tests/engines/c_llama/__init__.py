"""The tests' C engine (engine.c) and its GGUF writer (to_gguf.py): one build per test
session, shared by every test file that runs it (tests/conftest.py's ``c_engine``)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path
from typing import Sequence

HERE = Path(__file__).parent

__all__ = ["HERE", "build", "run"]


def build(out: Path) -> Path | None:
    """engine.c compiled to ``out`` as users build it (-O2, C99, every warning an error of
    the test's; never -march=native); None where no C compiler is on PATH."""
    cc = shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")
    if cc is None:
        return None
    done = subprocess.run([cc, "-O2", "-std=c99", "-Wall", "-Wextra", "-o", str(out),
                           str(HERE / "engine.c"), "-lm"], capture_output=True, text=True)
    if done.returncode != 0 or "warning" in done.stderr:
        raise AssertionError(f"engine.c does not build cleanly:\n{done.stderr}")
    return out


def run(engine: Path, gguf: Path, out: Path, prompt: Sequence[int], decode: int,
        forced: Sequence[int] | None, *args: str) -> subprocess.CompletedProcess:
    """The engine on ``gguf``: ``prompt``, ``decode`` steps fed ``forced`` (or its own
    tokens), its dump written to ``out``; its chosen tokens are on stdout."""
    cmd = [str(engine), str(gguf), "--tokens", ",".join(map(str, prompt)), "--decode",
           str(decode), "--dump", str(out),
           *(["--force", ",".join(map(str, forced))] if forced else []), *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=60)
