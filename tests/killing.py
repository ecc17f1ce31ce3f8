"""Run a Python script that records, and SIGKILL it once it printed a given line."""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path


def kill_after(script: Path, out: Path, last: str) -> list[str]:
    """Run ``script out``; SIGKILL it right after it prints ``last``. Returns the lines it
    printed (the test fails if it ends on its own first)."""
    proc = subprocess.Popen([sys.executable, str(script), str(out)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        lines: list[str] = []
        while not lines or lines[-1] != last:
            line = proc.stdout.readline() if proc.stdout else ""
            assert line, f"child ended early: {proc.stderr.read() if proc.stderr else ''}"
            lines.append(line.strip())
        proc.send_signal(signal.SIGKILL)
        assert proc.wait(timeout=30) == -signal.SIGKILL
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        for f in (proc.stdout, proc.stderr):
            if f is not None:
                f.close()
    return lines
