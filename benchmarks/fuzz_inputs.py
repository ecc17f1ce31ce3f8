"""Seeded random corruptions of dumps and checkpoints, each run through the real CLI.

    python benchmarks/fuzz_inputs.py --cases 1000 [--seed 0] [--jobs 2] [--timeout 20]
    python benchmarks/fuzz_inputs.py --seed 2 --only 1011 2132   # cases that failed, again

Every case copies a good dump or checkpoint (a dump with several dtypes and a stats-only
record, a safetensors file, a sharded directory, a PEFT adapter, a torch .bin, a GGUF), breaks
it in one to three ways (truncation, byte flips, index-line and header-field edits with huge,
negative, non-integer, deeply nested and markup values, non-UTF-8 bytes, links out of the
directory, FIFOs, directories and empty directories in place of files), then runs
``python -m lockstep.cli.main show|inspect|compare`` on it in a process of its own. A case
passes when the command exits 0, 1 or 2 within the timeout with no "Traceback" on stderr.
Prints the tally: cases, exit codes, tracebacks, hangs, the slowest case and the peak memory
of any one process; exits 1 if any case failed (its command and stderr are printed).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import struct
import subprocess
import sys
import tempfile
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

ROOT = Path(__file__).resolve().parents[1]
OK_CODES = {0, 1, 2, 3}  # 3: compare could not tell (incomplete), a clean answer too

# -- the good inputs ---------------------------------------------------------------------------


def make_bases(root: Path) -> dict[str, Path]:
    """One good input of each kind under ``root``."""
    import numpy as np

    sys.path.insert(0, str(ROOT / "src"))
    from lockstep.store import DumpWriter

    bases: dict[str, Path] = {}
    w = DumpWriter(root / "dump", {"engine": "fuzz", "model": "m", "prompt_token_ids": [1, 2]})
    rng = np.random.default_rng(0)
    for step in range(2):
        for name, dtype in (("model.embed_tokens", "float32"), ("model.layers.0.mlp", "float16"),
                            ("model.norm", "float64"), ("lm_head", "int32")):
            arr = (rng.standard_normal((2, 3)) * 4).astype(dtype)
            w.write(name, step, dtype, arr.shape, arr.tobytes(), role="output")
        w.write("probe", step, "bfloat16", (4,), np.arange(4, dtype=np.uint16).tobytes())
        w.write("stats.only", step, "float32", (8,), None,
                {"min": 0.0, "max": 1.0, "mean": 0.5, "std": 0.1, "abs_max": 1.0, "nan": 0,
                 "inf": 0, "zero": 1})
    w.close()
    bases["dump"] = root / "dump"

    import torch
    from safetensors.torch import save_file

    tensors = {"model.embed_tokens.weight": torch.randn(8, 4),
               "model.layers.0.self_attn.q_proj.weight": torch.randn(4, 4).to(torch.bfloat16),
               "model.norm.weight": torch.ones(4, dtype=torch.float16)}
    save_file(tensors, root / "model.safetensors", metadata={"format": "pt"})
    bases["safetensors"] = root / "model.safetensors"
    shards = root / "shards"
    shards.mkdir()
    save_file({"model.embed_tokens.weight": tensors["model.embed_tokens.weight"]},
              shards / "model-00001-of-00002.safetensors")
    save_file({"model.norm.weight": tensors["model.norm.weight"]},
              shards / "model-00002-of-00002.safetensors")
    (shards / "model.safetensors.index.json").write_text(json.dumps({
        "metadata": {"total_size": 72}, "weight_map": {
            "model.embed_tokens.weight": "model-00001-of-00002.safetensors",
            "model.norm.weight": "model-00002-of-00002.safetensors"}}))
    bases["shards"] = shards
    adapter = root / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(json.dumps(
        {"peft_type": "LORA", "r": 2, "lora_alpha": 4, "target_modules": ["q_proj", "v_proj"]}))
    save_file({"base_model.model.q_proj.lora_A.weight": torch.randn(2, 4),
               "base_model.model.q_proj.lora_B.weight": torch.zeros(4, 2)},
              adapter / "adapter_model.safetensors")
    bases["adapter"] = adapter
    torch.save({"a.weight": torch.randn(3, 3), "nested": {"b": torch.arange(4)},
                "list": [torch.ones(2, dtype=torch.bfloat16)]}, root / "model.bin")
    bases["bin"] = root / "model.bin"
    try:
        import gguf
    except ImportError:
        return bases
    writer = gguf.GGUFWriter(str(root / "model.gguf"), "llama")
    writer.add_head_count(2)
    writer.add_tensor("token_embd.weight", np.ones((4, 8), np.float32))
    q = gguf.GGMLQuantizationType.Q8_0
    writer.add_tensor("blk.0.ffn_up.weight", gguf.quants.quantize(
        np.linspace(-1, 1, 64 * 2, dtype=np.float32).reshape(2, 64), q), raw_dtype=q)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    bases["gguf"] = root / "model.gguf"
    return bases


# -- corruptions -------------------------------------------------------------------------------

HOSTILE_VALUES: list[Callable[[random.Random], Any]] = [
    lambda r: int("9" * r.choice([19, 20, 300, 4299])),  # under Python's 4300-digit limit
    lambda r: -r.randint(1, 2 ** 40),
    lambda r: 2 ** r.choice([31, 32, 40, 62, 63, 64, 70, 128]),
    lambda r: r.choice([0.5, -0.0, 1e308, -1e308]),
    lambda r: r.choice(["", "x", "[/]", "[bold]x", "a\x1bb", "\ud800", "é" * 50]),
    lambda r: r.choice([None, True, False]),
    lambda r: [r.randint(0, 3)] * r.choice([0, 1, 3, 65, 200]),
    lambda r: {"k": r.choice([[], {}, "[/x]"])},
    lambda r: r.choice([[0, 2 ** 62], [1] * 65, [-1], [2 ** 31] * 3, [0, 0, 2 ** 70]]),
]
_BIG_DIGITS = "1" * 4301  # over the limit: written as raw text, never built as a Python int


def _hostile(r: random.Random) -> Any:
    return r.choice(HOSTILE_VALUES)(r)


def _dumps(obj: Any) -> str:
    return json.dumps(obj, ensure_ascii=True)


def _writable(f: Path) -> bool:
    """A regular file of the case itself: never a link (an earlier mutation may have made the
    case's file a link to /etc/passwd, and writing through it would damage the machine)."""
    return not f.is_symlink() and f.is_file()


def _files(case: Path) -> list[Path]:
    if case.is_symlink() or not case.is_dir():
        return [case] if _writable(case) else []
    return sorted(p for p in case.rglob("*") if _writable(p))


def _pick_file(r: random.Random, case: Path) -> Path | None:
    files = _files(case)
    return r.choice(files) if files else None


def truncate(r: random.Random, case: Path) -> str:
    f = _pick_file(r, case)
    if f is None:
        return "truncate: nothing"
    size = f.stat().st_size
    keep = r.choice([0, 1, 7, 8, size // 2, max(size - 1, 0), r.randint(0, max(size, 1))])
    with open(f, "r+b") as fh:
        fh.truncate(min(keep, size))
    return f"truncate {f.name} to {keep}"


def flip_bytes(r: random.Random, case: Path) -> str:
    f = _pick_file(r, case)
    if f is None or f.stat().st_size == 0:
        return "flip: nothing"
    raw = bytearray(f.read_bytes())
    n = r.choice([1, 2, 8, 32])
    for _ in range(n):
        i = r.randrange(len(raw)) if r.random() < 0.6 else r.randrange(min(len(raw), 200))
        raw[i] = r.randrange(256)
    f.write_bytes(bytes(raw))
    return f"flip {n} bytes of {f.name}"


def non_utf8(r: random.Random, case: Path) -> str:
    f = _pick_file(r, case)
    if f is None:
        return "non-utf8: nothing"
    raw = f.read_bytes()
    at = r.randint(0, len(raw))
    f.write_bytes(raw[:at] + r.choice([b"\xff\xfe", b"\xc3", b"\xed\xa0\x80", b"\x00"]) + raw[at:])
    return f"non-UTF-8 bytes into {f.name} at {at}"


def _edit_json_obj(r: random.Random, obj: Any) -> Any:
    if isinstance(obj, dict) and obj:
        key = r.choice(list(obj))
        if isinstance(obj[key], (dict, list)) and obj[key] and r.random() < 0.5:
            obj[key] = _edit_json_obj(r, obj[key])
        else:
            obj[key] = _hostile(r)
    elif isinstance(obj, list) and obj:
        i = r.randrange(len(obj))
        obj[i] = _hostile(r)
    elif isinstance(obj, dict):
        obj[r.choice(["type", "meta", "weight_map", "x"])] = _hostile(r)
    return obj


def _json_text(r: random.Random, obj: Any) -> str:
    try:
        text = _dumps(_edit_json_obj(r, obj))
    except (TypeError, ValueError):
        text = _dumps(obj)
    if r.random() < 0.1:  # an integer over the limit, spliced in as text
        text = text.replace("0", _BIG_DIGITS, 1)
    if r.random() < 0.05:
        depth = r.choice([100, 1000, 100000])
        text = text[:-1] + ',"deep":' + "[" * depth + "]" * depth + "}" \
            if text.endswith("}") else "[" * depth + "]" * depth
    return text


def edit_index_line(r: random.Random, case: Path) -> str:
    index = case / "index.jsonl" if case.is_dir() and not case.is_symlink() else None
    if index is None or not _writable(index):
        return edit_json_file(r, case)
    lines = index.read_bytes().split(b"\n")
    i = r.randrange(max(len(lines) - 1, 1))
    action = r.choice(["field", "field", "field", "drop", "dup", "swap", "type"])
    try:
        obj = json.loads(lines[i])
    except ValueError:
        obj = None
    if action == "drop":
        del lines[i]
    elif action == "dup":
        lines.insert(i, lines[i])
    elif action == "swap" and len(lines) > 2:
        j = r.randrange(len(lines) - 1)
        lines[i], lines[j] = lines[j], lines[i]
    elif action == "type" and isinstance(obj, dict):
        obj["type"] = r.choice(["tensor", "meta", "end", "header", "bogus", None])
        lines[i] = _dumps(obj).encode()
    elif obj is not None:
        lines[i] = _json_text(r, obj).encode("utf-8", "surrogatepass")
    index.write_bytes(b"\n".join(lines))
    return f"index line {i + 1}: {action}"


def edit_json_file(r: random.Random, case: Path) -> str:
    """A JSON file of a checkpoint (index, adapter config) or a safetensors header."""
    files = [f for f in _files(case) if f.suffix == ".json" or f.suffix == ".safetensors"]
    if not files:
        return flip_bytes(r, case)
    f = r.choice(files)
    raw = f.read_bytes()
    if f.suffix == ".json":
        try:
            f.write_bytes(_json_text(r, json.loads(raw)).encode("utf-8", "surrogatepass"))
        except ValueError:
            pass
        return f"edit {f.name}"
    if len(raw) < 8:
        return "edit header: too short"
    (n,) = struct.unpack("<Q", raw[:8])
    try:
        header = json.loads(raw[8:8 + n])
    except ValueError:
        return "edit header: not JSON"
    text = _json_text(r, header).encode("utf-8", "surrogatepass")
    f.write_bytes(struct.pack("<Q", len(text)) + text + raw[8 + n:])
    return f"edit the header of {f.name}"


def replace_with(r: random.Random, case: Path, outside: Path) -> str:
    f = _pick_file(r, case)
    if f is None:
        return "replace: nothing"
    kind = r.choice(["symlink out", "symlink /etc/passwd", "fifo", "directory", "delete",
                     "symlink loop"])
    f.unlink()
    if kind == "symlink out":
        f.symlink_to(outside)
    elif kind == "symlink /etc/passwd":
        f.symlink_to("/etc/passwd")
    elif kind == "fifo":
        os.mkfifo(f)
    elif kind == "directory":
        f.mkdir()
    elif kind == "symlink loop":
        f.symlink_to(f.name)
    return f"{f.name} -> {kind}"


def empty_dir(r: random.Random, case: Path) -> str:
    if case.is_dir() and not case.is_symlink():
        shutil.rmtree(case)
        case.mkdir()
    return "empty directory"


def shard_name(r: random.Random, case: Path) -> str:
    index = case / "model.safetensors.index.json"
    if case.is_symlink() or not _writable(index):
        return edit_index_line(r, case)
    data = json.loads(index.read_text())
    key = r.choice(list(data["weight_map"]))
    data["weight_map"][key] = r.choice(["../outside.safetensors", "/etc/passwd", "",
                                        "sub/../../x.safetensors", "model.bin", "nul\u0000.st",
                                        "x" * 5000, 7])
    index.write_text(json.dumps(data))
    return f"weight_map[{key}] = hostile"


MUTATIONS = {"truncate": truncate, "flip": flip_bytes, "non-utf8": non_utf8,
             "index line": edit_index_line, "json": edit_json_file, "empty dir": empty_dir,
             "shard name": shard_name}


@dataclass
class Case:
    n: int
    argv: list[str]
    what: str


def make_case(n: int, seed: int, bases: dict[str, Path], root: Path) -> Case:
    r = random.Random(seed * 1_000_003 + n)
    kind = r.choice([k for k in ("dump", "dump", "dump", "safetensors", "shards", "adapter",
                                 "bin", "gguf") if k in bases])
    base = bases[kind]
    where = root / f"case{n}"
    where.mkdir()
    case = where / base.name
    if base.is_dir():
        shutil.copytree(base, case)
    else:
        shutil.copy(base, case)
    outside = bases["safetensors"]
    done = []
    for _ in range(r.choice([1, 1, 2, 3])):
        if not case.exists():
            break
        try:
            if r.random() < 0.12:
                done.append(replace_with(r, case, outside))
                continue
            name = r.choice(list(MUTATIONS))
            done.append(MUTATIONS[name](r, case))
        except (OSError, ValueError, TypeError, KeyError, IndexError, AttributeError,
                RecursionError) as exc:
            # an earlier mutation left nothing this one can work on: the case goes on as is
            done.append(f"(mutation skipped: {type(exc).__name__})")
    if kind == "dump":
        command = r.choice([["show"], ["show", "--all"], ["show", "--step", "1"],
                            ["compare", str(bases["dump"])]])
        argv = [command[0], str(case), *command[1:]]
    else:
        argv = ["inspect", str(case)]
        if r.random() < 0.2:
            argv += ["--against", str(bases["safetensors"])]
    return Case(n, argv, f"{kind}: " + "; ".join(done))


# -- running -----------------------------------------------------------------------------------


@dataclass
class Result:
    case: Case
    code: int | None  #: None: it hung (killed at the timeout)
    seconds: float
    stderr: str
    max_rss_kib: int

    @property
    def traceback(self) -> bool:
        return "Traceback" in self.stderr or "internal error" in self.stderr

    @property
    def ok(self) -> bool:
        return self.code in OK_CODES and not self.traceback


def run_case(case: Case, timeout: float, src: Path = ROOT / "src") -> Result:
    env = {**os.environ, "PYTHONPATH": str(src), "COLUMNS": "120",
           "HF_HUB_OFFLINE": "1", "PYTHONWARNINGS": "ignore"}
    argv = [sys.executable, "-c", _RUNNER, *case.argv]
    start = time.monotonic()
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
    try:
        _, err = proc.communicate(timeout=timeout)
        code: int | None = proc.returncode
    except subprocess.TimeoutExpired:
        proc.kill()
        _, err = proc.communicate()
        code = None
    took = time.monotonic() - start
    text = err.decode("utf-8", "replace")
    rss = 0
    marker = text.rfind("\nfuzz-maxrss-kib ")
    if marker >= 0 or text.startswith("fuzz-maxrss-kib "):
        tail = text[marker + 1:] if marker >= 0 else text
        rss = int(tail.split()[1])
        text = text[:marker + 1] if marker >= 0 else ""
    return Result(case, code, took, text, rss)


# the CLI, then its own peak memory on stderr's last line (the exit code kept)
_RUNNER = (
    "import resource, sys\n"
    "from lockstep.cli.main import main\n"
    "sys.argv[0] = 'lockstep'\n"
    "try:\n"
    "    code = main(sys.argv[1:])\n"
    "except SystemExit as exc:\n"
    "    code = exc.code if isinstance(exc.code, int) else 2\n"
    "sys.stderr.write('\\nfuzz-maxrss-kib %d\\n' % "
    "resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)\n"
    "sys.exit(code)\n"
)


def fuzz(cases: int, seed: int = 0, jobs: int = 2, timeout: float = 20.0,
         root: Path | None = None, progress: Callable[[int], None] | None = None,
         only: list[int] | None = None) -> list[Result]:
    """Make and run ``cases`` cases (or the case numbers in ``only``: each case depends on
    the seed and its number alone); every Result, in case order."""
    own = root is None
    root = Path(tempfile.mkdtemp(prefix="lockstep-fuzz-")) if root is None else root
    try:
        # the code under test, copied: edits to the checkout during a long run do not leak in
        src = root / "src"
        shutil.copytree(ROOT / "src", src, ignore=shutil.ignore_patterns("__pycache__"))
        bases = make_bases(root / "bases")
        work = root / "cases"
        work.mkdir()
        made = [make_case(n, seed, bases, work) for n in (only or range(cases))]
        results: list[Result] = []
        with ThreadPoolExecutor(max_workers=jobs) as pool:
            for i, res in enumerate(pool.map(lambda c: run_case(c, timeout, src), made)):
                results.append(res)
                if progress is not None:
                    progress(i + 1)
        return results
    finally:
        if own:
            shutil.rmtree(root, ignore_errors=True)


def tally(results: list[Result], timeout: float) -> str:
    codes = Counter("hang" if r.code is None else r.code for r in results)
    tracebacks = sum(r.traceback for r in results)
    hangs = codes.get("hang", 0)
    slowest = max(results, key=lambda r: r.seconds)
    lines = [
        f"cases: {len(results)}",
        "exit codes: " + ", ".join(f"{k}: {v}" for k, v in sorted(codes.items(), key=str)),
        f"tracebacks (or internal errors): {tracebacks}",
        f"hangs (over {timeout:g} s): {hangs}",
        f"slowest case: {slowest.seconds:.1f} s (case {slowest.case.n}: {slowest.case.what})",
        f"peak memory of one process: {max(r.max_rss_kib for r in results) / 1024:.0f} MiB",
        f"failed: {sum(not r.ok for r in results)}",
    ]
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cases", type=int, default=200)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--jobs", type=int, default=2, help="cases run at once")
    ap.add_argument("--timeout", type=float, default=20.0, help="seconds before a case hangs")
    ap.add_argument("--only", type=int, nargs="+", metavar="N",
                    help="run just these case numbers (of this seed): a failure again")
    args = ap.parse_args()
    if args.only:
        args.cases = len(args.only)
    start = time.monotonic()
    results = fuzz(args.cases, args.seed, args.jobs, args.timeout, only=args.only,
                   progress=lambda i: print(f"\r{i}/{args.cases}", end="", file=sys.stderr,
                                            flush=True))
    print(file=sys.stderr)
    for r in results:
        if not r.ok:
            print(f"FAILED case {r.case.n} ({r.case.what}): lockstep {' '.join(r.case.argv)}"
                  f" -> {r.code}\n{r.stderr.strip()[-2000:]}\n")
    which = f"--only {' '.join(map(str, args.only))}" if args.only else f"--cases {args.cases}"
    print(f"command: python benchmarks/fuzz_inputs.py {which} --seed {args.seed} "
          f"--jobs {args.jobs} --timeout {args.timeout:g}")
    print(tally(results, args.timeout))
    print(f"wall time: {time.monotonic() - start:.0f} s")
    return 0 if all(r.ok for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
