"""Reports have one model: an object with a terminal face and ``to_json()``, printed by one CLI
helper, with every file face (``report.faces``) an option of every command that shows one."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import save_file

import lockstep
from lockstep.cli.main import main
from lockstep.report import faces

CLI = Path(lockstep.__file__).parent / "cli"


def _write_names(report, path) -> None:
    """A face for the test: the report's kind and its JSON keys, one per line."""
    Path(path).write_text("\n".join([report.kind, *sorted(report.to_json())]) + "\n")


@pytest.fixture
def checkpoint(tmp_path) -> Path:
    bad = np.ones((4, 3), np.float32)
    bad[1, 2] = np.nan
    path = tmp_path / "model.safetensors"
    save_file({"model.layers.0.mlp.up_proj.weight": bad,
               "model.embed_tokens.weight": np.zeros((5, 3), np.float32)}, str(path))
    return path


def test_a_new_face_is_one_entry_and_every_report_command_takes_it(monkeypatch, checkpoint,
                                                                   tmp_path, capsys):
    face = faces.Face("names", "also write the kind and keys", f"{__name__}:_write_names")
    monkeypatch.setattr(faces, "FACES", (*faces.FACES, face))
    out, page = tmp_path / "inspect.names", tmp_path / "inspect.json"
    assert main(["inspect", str(checkpoint), "--names", str(out), "--json", str(page)]) == 1
    printed = capsys.readouterr().out
    assert "1 bad" in printed  # the terminal face, from the same object
    lines = out.read_text().splitlines()
    assert lines[0] == "inspect"
    assert lines[1:] == sorted(json.loads(page.read_text()))  # the JSON face's own keys
    for command in ("compare", "diff", "replay", "generate", "weights", "zoo", "bench"):
        with pytest.raises(SystemExit):
            main([command, "--help"])
        assert "--names FILE" in capsys.readouterr().out, command


def test_no_command_handler_makes_a_console():
    makers = [f"{path.name}:{n}" for path in sorted(CLI.glob("*.py")) if path.name != "output.py"
              for n, line in enumerate(path.read_text().splitlines(), 1)
              if re.search(r"\bConsole\(|\bProgress\(", line)]
    assert makers == []
