"""Broken GGUF and torch .bin files: one line, exit 2, for `inspect` and `inspect --against`;
a pickle holding anything but tensors is refused, never run."""

from __future__ import annotations

import pickle
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from lockstep.checkpoint import CheckpointError, against_checkpoints, inspect_checkpoint
from lockstep.cli.main import main

gguf = pytest.importorskip("gguf")

MARKER = "pwned-marker"


class Hostile:
    """Unpickling this creates a file: proof that the pickle ran."""

    def __init__(self, where: Path) -> None:
        self.where = where

    def __reduce__(self):
        return (Path.touch, (self.where,))


def _gguf(path: Path) -> bytes:
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_head_count(2)
    rng = np.random.default_rng(0)
    writer.add_tensor("token_embd.weight", rng.standard_normal((40, 32)).astype(np.float32))
    q = gguf.GGMLQuantizationType.Q8_0
    writer.add_tensor("blk.0.ffn_up.weight", gguf.quants.quantize(
        rng.standard_normal((48, 64)).astype(np.float32), q), raw_dtype=q)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path.read_bytes()


def _patched(raw: bytes, at: int, value: bytes) -> bytes:
    return raw[:at] + value + raw[at + len(value):]


def _make(tmp_path: Path, case: str) -> Path:
    if case.startswith("gguf"):
        raw = _gguf(tmp_path / "good.gguf")
        name = b"token_embd.weight"
        dims = raw.index(name) + len(name) + 4  # after the name: n_dims (u32), then ne[]
        broken = {
            "gguf_truncated": raw[:len(raw) * 2 // 3],
            "gguf_truncated_header": raw[:100],
            "gguf_bad_version": _patched(raw, 4, struct.pack("<I", 99)),
            "gguf_tensor_count": _patched(raw, 8, struct.pack("<Q", 1 << 40)),
            "gguf_absurd_shape": _patched(raw, dims, struct.pack("<Q", 1 << 40)),
            "gguf_not_gguf": b"GGML" + raw[4:],
        }[case]
        path = tmp_path / "m.gguf"
    else:
        good = tmp_path / "good.bin"
        torch.save({"w": torch.ones(200, 200)}, good)
        if case == "bin_hostile_in_state":
            torch.save({"w": torch.ones(3), "x": Hostile(tmp_path / MARKER)},
                       tmp_path / "m.bin")
            return tmp_path / "m.bin"
        broken = {
            "bin_random": np.random.default_rng(0).bytes(1000),
            "bin_text": b"version https://git-lfs.github.com/spec/v1\noid sha256:00\n",
            "bin_truncated": good.read_bytes()[:-5000],
            "bin_raw_pickle": pickle.dumps(Hostile(tmp_path / MARKER)),
        }[case]
        path = tmp_path / "m.bin"
    path.write_bytes(broken)
    return path


CASES = ["gguf_truncated", "gguf_truncated_header", "gguf_bad_version", "gguf_tensor_count",
         "gguf_absurd_shape", "gguf_not_gguf", "bin_random", "bin_text", "bin_truncated",
         "bin_raw_pickle", "bin_hostile_in_state"]


def _one_line(capsys, path: Path) -> str:
    err = capsys.readouterr().err
    assert err.startswith("lockstep: error: ") and str(path) in err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    return err


@pytest.mark.parametrize("case", CASES)
def test_broken_checkpoint_is_one_line(tmp_path, capsys, case):
    path = _make(tmp_path, case)
    good = tmp_path / "good.safetensors"
    save_file({"token_embd.weight": torch.ones(40, 32)}, str(good))
    capsys.readouterr()
    assert main(["inspect", str(path)]) == 2
    err = _one_line(capsys, path)
    assert main(["inspect", str(good), "--against", str(path)]) == 2
    _one_line(capsys, path)
    assert main(["inspect", str(path), "--against", str(good)]) == 2
    _one_line(capsys, path)
    with pytest.raises(CheckpointError):
        inspect_checkpoint(path)
    with pytest.raises(CheckpointError):
        against_checkpoints(good, path)
    if case.startswith("gguf"):
        assert "not a readable GGUF file" in err
    else:
        assert "weights_only=True" in err
    if case == "bin_hostile_in_state":
        assert "Weights only load failed" in err
    assert not (tmp_path / MARKER).exists()  # nothing was unpickled


def test_good_gguf_reads(tmp_path):
    """The files broken above are whole here: the errors come from the damage."""
    _gguf(tmp_path / "m.gguf")
    report = inspect_checkpoint(tmp_path / "m.gguf")
    assert [(t.name, t.dtype, t.shape) for t in report.tensors] == [
        ("token_embd.weight", "F32", (40, 32)), ("blk.0.ffn_up.weight", "Q8_0", (48, 64))]
    torch.save({"w": torch.ones(200, 200)}, tmp_path / "m.bin")
    assert inspect_checkpoint(tmp_path / "m.bin").tensors[0].stats["max"] == 1.0
