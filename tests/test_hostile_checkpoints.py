"""Checkpoints anyone could write, inspected by ``lockstep inspect`` in a real process: exit
0, 1 (bad or unreadable tensors, each named) or 2 (one line), never a traceback or a hang,
and no file read that the user did not name (docs/cli.md, inspect)."""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

gguf = pytest.importorskip("gguf")

CLI = [sys.executable, "-m", "lockstep.cli.main"]


def inspect(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([*CLI, "inspect", *args], capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, "COLUMNS": "200",
                                                "PYTHONWARNINGS": "ignore"})


def one_line(res: subprocess.CompletedProcess, *words: str) -> str:
    assert res.returncode == 2, (res.stdout, res.stderr)
    assert "Traceback" not in res.stderr and len(res.stderr.splitlines()) == 1, res.stderr
    for word in words:
        assert word in res.stderr, res.stderr
    return res.stderr


def _raw_safetensors(path: Path, header: bytes, data: bytes = b"") -> Path:
    path.write_bytes(struct.pack("<Q", len(header)) + header + data)
    return path


def _shards(root: Path, weight_map: dict | str) -> Path:
    root.mkdir(exist_ok=True)
    save_file({"a": torch.ones(2)}, root / "s1.safetensors")
    text = weight_map if isinstance(weight_map, str) else json.dumps({"weight_map": weight_map})
    (root / "model.safetensors.index.json").write_text(text)
    return root


DEEP = "[" * 100000 + "]" * 100000


def test_a_header_nested_100000_deep(tmp_path):
    one_line(inspect(str(_raw_safetensors(tmp_path / "m.safetensors",
                                          ('{"a":' + DEEP + "}").encode()))), "nested too deeply")


def test_a_shard_index_nested_100000_deep(tmp_path):
    one_line(inspect(str(_shards(tmp_path / "c", '{"weight_map":' + DEEP + "}"))),
             "nested too deeply")


@pytest.mark.parametrize("where", ["header", "index"])
def test_an_integer_of_4301_digits(tmp_path, where):
    big = "9" * 4301
    if where == "header":
        path = _raw_safetensors(tmp_path / "m.safetensors", (
            '{"a":{"dtype":"F32","shape":[' + big + '],"data_offsets":[0,4]}}').encode())
    else:
        path = _shards(tmp_path / "c", '{"weight_map":{"a":"s1.safetensors"},"n":' + big + "}")
    one_line(inspect(str(path)), "not usable JSON")


def test_a_gguf_tensor_with_ne0_zero(tmp_path):
    writer = gguf.GGUFWriter(str(tmp_path / "z.gguf"), "llama")
    writer.add_tensor("empty.weight", np.zeros((3, 0), np.float32))
    writer.add_tensor("full.weight", np.ones((2, 4), np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    res = inspect(str(tmp_path / "z.gguf"))
    assert res.returncode == 0, res.stderr
    assert "2 tensors" in res.stdout


def test_a_weight_map_naming_a_bin_shard(tmp_path):
    root = _shards(tmp_path / "c", {"a": "s1.safetensors", "b": "s2.bin"})
    torch.save({"b": torch.ones(3)}, root / "s2.bin")
    res = inspect(str(root))
    assert res.returncode == 0, res.stderr
    assert "2 tensors" in res.stdout


def test_a_weight_map_leaving_the_directory_is_refused(tmp_path):
    save_file({"b": torch.ones(2)}, tmp_path / "outside.safetensors")
    root = _shards(tmp_path / "c", {"a": "s1.safetensors", "b": "../outside.safetensors"})
    one_line(inspect(str(root)), "outside the checkpoint directory")
    (root / "model.safetensors.index.json").write_text(json.dumps(
        {"weight_map": {"a": "s1.safetensors", "b": "/etc/passwd"}}))
    err = one_line(inspect(str(root)), "outside the checkpoint directory")
    assert "header" not in err  # refused by name: the file was never opened


def test_a_link_out_of_a_checkpoint_directory_is_refused(tmp_path):
    save_file({"b": torch.ones(2)}, tmp_path / "outside.safetensors")
    root = tmp_path / "c"
    root.mkdir()
    save_file({"a": torch.ones(2)}, root / "a.safetensors")
    (root / "b.safetensors").symlink_to(tmp_path / "outside.safetensors")
    one_line(inspect(str(root)), "symbolic link that leads out")
    assert inspect(str(root / "b.safetensors")).returncode == 0  # named: its target is read


def test_a_hugging_face_cache_snapshot_links_into_blobs(tmp_path):
    repo = tmp_path / "models--x--y"
    (repo / "blobs").mkdir(parents=True)
    save_file({"a": torch.ones(2)}, repo / "blobs" / "0123abcd")
    snap = repo / "snapshots" / "rev1"
    snap.mkdir(parents=True)
    (snap / "model.safetensors").symlink_to("../../blobs/0123abcd")
    res = inspect(str(snap))
    assert res.returncode == 0, res.stderr


def test_adapter_target_modules_of_mixed_types(tmp_path):
    root = tmp_path / "adapter"
    root.mkdir()
    (root / "adapter_config.json").write_text(json.dumps(
        {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", 1, None]}))
    save_file({"base_model.model.q_proj.lora_A.weight": torch.ones(4, 8)},
              root / "adapter_model.safetensors")
    res = inspect(str(root))
    assert res.returncode == 0, res.stderr
    assert "target_modules=['1', 'None', 'q_proj']" in res.stdout


def test_a_directory_named_like_a_tensor_file(tmp_path):
    root = tmp_path / "c"
    (root / "x.safetensors").mkdir(parents=True)
    one_line(inspect(str(root)), "not a regular file (a directory)")


def test_fifos_never_block(tmp_path):
    os.mkfifo(tmp_path / "w.bin")
    start = time.monotonic()
    one_line(inspect(str(tmp_path / "w.bin"), timeout=20), "not a regular file (a FIFO)")
    root = tmp_path / "c"
    root.mkdir()
    os.mkfifo(root / "w.bin")
    one_line(inspect(str(root), timeout=20), "not a regular file (a FIFO)")
    os.mkfifo(root / "adapter_config.json")
    one_line(inspect(str(root), timeout=20), "not a regular file (a FIFO)")
    assert time.monotonic() - start < 40


def test_a_bin_holding_a_list_that_contains_itself(tmp_path):
    loop: list = [torch.ones(2)]
    loop.append(loop)
    torch.save({"l": loop, "w": torch.zeros(3)}, tmp_path / "loop.bin")
    res = inspect(str(tmp_path / "loop.bin"))
    assert res.returncode == 0, res.stderr
    assert "2 tensors" in res.stdout


@pytest.mark.filterwarnings("ignore::UserWarning")  # torch: qint8 deprecated, CSR in beta
def test_unreadable_tensors_are_reported_and_the_rest_read(tmp_path):
    q = torch.quantize_per_tensor(torch.ones(3), 0.5, 0, torch.qint8)
    raw = torch.arange(8, dtype=torch.uint8)
    state = {
        "good": torch.ones(4),
        "nan": torch.tensor([1.0, float("nan")]),
        "e4m3fnuz": torch.ones(4).to(torch.float8_e4m3fnuz),
        "e5m2fnuz": torch.ones(4).to(torch.float8_e5m2fnuz),
        "e8m0": raw.view(torch.float8_e8m0fnu),
        "f4x2": raw.view(torch.float4_e2m1fn_x2),
        "bits8": raw.view(torch.bits8),
        "qint8": q,
        "coo": torch.eye(3).to_sparse(),
        "csr": torch.eye(3).to_sparse_csr(),
        "meta": torch.empty(5, device="meta"),
    }
    torch.save(state, tmp_path / "odd.bin")
    res = inspect(str(tmp_path / "odd.bin"), "--json", str(tmp_path / "r.json"))
    assert res.returncode == 1, res.stderr
    assert "Traceback" not in res.stderr
    report = json.loads((tmp_path / "r.json").read_text())
    unreadable = {t["name"]: t["why"] for t in report["unreadable_tensors"]}
    assert set(unreadable) == {"f4x2", "bits8", "coo", "csr", "meta"}, unreadable
    assert "not readable" in res.stdout and "f4x2" in res.stdout
    stats = {t["name"]: t["stats"] for t in report["tensors"]}
    assert stats["good"]["max"] == 1.0 and stats["nan"]["nan"] == 1
    assert stats["e4m3fnuz"]["max"] == 1.0 and stats["qint8"]["max"] == 1.0


def test_an_expanded_tensor_is_read_once_per_stored_element(tmp_path):
    torch.save({"big": torch.zeros(1).expand(2 ** 34), "small": torch.ones(2)},
               tmp_path / "x.bin")
    assert (tmp_path / "x.bin").stat().st_size < 4096
    start = time.monotonic()
    res = inspect(str(tmp_path / "x.bin"), "--json", str(tmp_path / "r.json"))
    took = time.monotonic() - start
    assert res.returncode == 0, res.stderr
    assert took < 20, took
    big = next(t for t in json.loads((tmp_path / "r.json").read_text())["tensors"]
               if t["name"] == "big")
    assert big["stats"]["zero"] == 2 ** 34 and big["stats"]["max"] == 0.0


MARKUP = ["[/]", "[bold]x", "[/x].weight"]


def test_tensor_names_print_as_text(tmp_path):
    save_file({name: torch.tensor([float("nan"), 1.0]) for name in MARKUP},
              tmp_path / "a.safetensors")
    res = inspect(str(tmp_path / "a.safetensors"))
    assert res.returncode == 1, res.stderr
    for name in MARKUP:
        assert name in res.stdout
    save_file({name: torch.zeros(2) for name in MARKUP}, tmp_path / "b.safetensors")
    res = inspect(str(tmp_path / "a.safetensors"), "--against", str(tmp_path / "b.safetensors"))
    assert res.returncode == 1 and "Traceback" not in res.stderr, res.stderr
    for name in MARKUP:
        assert name in res.stdout


def test_weights_report_prints_names_as_text(tmp_path):
    import io

    from rich.console import Console

    from lockstep.checkpoint import check_loaded
    from lockstep.checkpoint.weights_render import render_check

    model = torch.nn.Sequential()
    model.add_module("[/]", torch.nn.Linear(2, 2))
    model.add_module("[bold]b", torch.nn.Linear(2, 2))
    save_file({k: v.detach() + 1 for k, v in model.state_dict().items()},
              tmp_path / "c.safetensors")
    check = check_loaded(model, tmp_path / "c.safetensors")
    console = Console(file=io.StringIO(), width=200)
    for item in render_check(check):
        console.print(item)
    out = console.file.getvalue()
    assert "[/].weight" in out and "[bold]b.weight" in out


def test_against_reports_an_unreadable_tensor_and_compares_the_rest(tmp_path):
    raw = torch.arange(4, dtype=torch.uint8)
    torch.save({"a": torch.ones(4), "b": raw.view(torch.bits8),
                "c": torch.zeros(1).expand(2 ** 20)}, tmp_path / "x.bin")
    save_file({"a": torch.ones(4), "b": torch.zeros(4, dtype=torch.uint8),
               "c": torch.zeros(2 ** 20)}, tmp_path / "y.safetensors")
    res = inspect(str(tmp_path / "x.bin"), "--against", str(tmp_path / "y.safetensors"),
                  "--json", str(tmp_path / "r.json"))
    assert res.returncode == 1 and "Traceback" not in res.stderr, res.stderr
    pairs = {p["key"]: p for p in json.loads((tmp_path / "r.json").read_text())["pairs"]}
    assert pairs["a"]["status"] == "ok"
    assert pairs["b"]["status"] == "unreadable" and "bits8" in pairs["b"]["note"]
    assert pairs["c"]["status"] == "unreadable" and "stride 0" in pairs["c"]["note"]
    assert "unreadable" in res.stdout


@pytest.mark.parametrize("looped", ["adapter_config.json", "adapter_model.safetensors"])
def test_a_symlink_loop_in_a_checkpoint_directory(tmp_path, looped):
    # found by benchmarks/fuzz_inputs.py --cases 1000 --seed 1 (cases 372, 635)
    root = tmp_path / "adapter"
    root.mkdir()
    (root / "adapter_config.json").write_text(json.dumps({"r": 2}))
    save_file({"a.lora_A.weight": torch.ones(2, 2)}, root / "adapter_model.safetensors")
    (root / looped).unlink()
    (root / looped).symlink_to(looped)
    one_line(inspect(str(root)), "loops")


def test_a_shard_name_with_a_lone_surrogate(tmp_path):
    # found by benchmarks/fuzz_inputs.py --cases 1000 --seed 1 (case 93)
    root = _shards(tmp_path / "c", '{"weight_map": {"a": "s1.safetensors", "b": "x\\ud800"}}')
    one_line(inspect(str(root)), "not a valid file name")


@pytest.mark.parametrize("dtype", [{}, [], ["F32"]])
def test_a_header_dtype_that_is_not_a_string(tmp_path, dtype):
    # found by benchmarks/fuzz_inputs.py --cases 3000 --seed 2 (cases 1011, 2132)
    header = json.dumps({"a": {"dtype": dtype, "shape": [1], "data_offsets": [0, 4]}})
    path = _raw_safetensors(tmp_path / "m.safetensors", header.encode(), b"\0" * 4)
    one_line(inspect(str(path)), "unknown dtype")
