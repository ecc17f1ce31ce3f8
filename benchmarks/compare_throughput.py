#!/usr/bin/env python
"""How fast ``lockstep.compare`` reads two dumps, and how much memory it holds while it does.

For each size, two dumps of a SmolLM2-135M-shaped prefill (30 layers, hidden 576, every
module output: 397 float32 records, logits included) are written under a temporary folder,
with as many tokens as it takes to reach that size per dump; the candidate is the reference
plus noise of relative size 3e-5 (below float32's match tolerance of 1e-4, so the verdict
is match; every pair is still measured in full). Then a child
process opens both and runs ``lockstep.compare``, while this process samples the child's
``/proc/PID/status`` every 5 ms: anonymous memory (``RssAnon``: what compare allocates) apart
from file pages mapped from the dumps (``RssFile``). The folder is removed afterwards,
also when the run fails or is stopped (Ctrl-C, SIGTERM, SIGHUP).

Throughput counts the data of both dumps: (reference data + candidate data) / compare time.
The dumps were just written, so their pages are in the OS's page cache: this measures
compare, not the disk.

    python benchmarks/compare_throughput.py                    # 0.5 GB and 5 GB per dump
    python benchmarks/compare_throughput.py --sizes 0.5        # quick
    python benchmarks/compare_throughput.py --sizes 8.5        # over 8 GB, if the disk has room
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from typing import Any

import numpy as np

from lockstep.store.writer import DumpWriter

LAYERS, HIDDEN, FFN, HEADS, KV, VOCAB = 30, 576, 1536, 9, 3, 49152
TARGET_MBS = 1000.0
TARGET_ANON_MB = 300.0
TARGET_RSS_MB = 1000.0  # everything resident: anonymous, dump pages mapped, libraries

# every module output of a Llama decoder layer: (name, width) at each token
_LAYER = [("input_layernorm", HIDDEN), ("self_attn.q_proj", HIDDEN),
          ("self_attn.k_proj", HIDDEN * KV // HEADS), ("self_attn.v_proj", HIDDEN * KV // HEADS),
          ("self_attn.o_proj", HIDDEN), ("self_attn:0", HIDDEN),
          ("post_attention_layernorm", HIDDEN), ("mlp.gate_proj", FFN), ("mlp.act_fn", FFN),
          ("mlp.up_proj", FFN), ("mlp.down_proj", HIDDEN), ("mlp", HIDDEN), ("", HIDDEN)]


def records() -> list[tuple[str, int]]:
    out = [("model.embed_tokens", HIDDEN)]
    for i in range(LAYERS):
        out += [(f"model.layers.{i}.{n}" if n else f"model.layers.{i}", w) for n, w in _LAYER]
    out += [("model.norm", HIDDEN), ("model", HIDDEN), ("lm_head", VOCAB), ("", VOCAB)]
    return out


def write_pair(folder: str, size_bytes: float) -> tuple[str, str, int, int]:
    """Two dumps of about ``size_bytes`` each; returns their paths, the tokens and bytes."""
    recs = records()
    per_token = 4 * sum(w for _, w in recs)
    tokens = max(1, round(size_bytes / per_token))
    rng = np.random.default_rng(0)
    block = rng.standard_normal(1 << 22, dtype=np.float32)  # reused, shifted: fast to make
    noise = np.float32(3e-5) * rng.standard_normal(1 << 22, dtype=np.float32)
    paths = (os.path.join(folder, "ref"), os.path.join(folder, "cand"))
    writers = [DumpWriter(p, {"engine": "bench", "model": "smollm2-shape"}) for p in paths]
    total = 0
    for seq, (name, width) in enumerate(recs):
        n = tokens * width
        shift = (seq * 7919) % block.size
        ref = np.resize(np.roll(block, shift), n).reshape(1, tokens, width)
        cand = ref + np.resize(np.roll(noise, shift), n).reshape(ref.shape)
        for w, arr in zip(writers, (ref, cand)):
            w.write(name, 0, "float32", arr.shape, memoryview(arr), role="output")
        total += ref.nbytes
        del ref, cand
    for w in writers:
        w.close()
    return paths[0], paths[1], tokens, total


_CHILD = """
import json, sys, time
import lockstep
t, cpu = time.perf_counter(), time.process_time()
c = lockstep.compare(sys.argv[1], sys.argv[2])
dt, dcpu = time.perf_counter() - t, time.process_time() - cpu
print(json.dumps({"seconds": dt, "cpu_seconds": dcpu, "verdict": c.verdict,
                  "pairs": len(c.results)}))
"""


def status(pid: int) -> dict[str, int]:
    """The memory lines of /proc/PID/status, in kB."""
    out: dict[str, int] = {}
    try:
        with open(f"/proc/{pid}/status", encoding="ascii") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key in ("VmRSS", "VmHWM", "RssAnon", "RssFile", "RssShmem"):
                    out[key] = int(value.split()[0])
    except (FileNotFoundError, ProcessLookupError):
        pass
    return out


def run_compare(ref: str, cand: str) -> dict[str, Any]:
    """lockstep.compare in a child process, its memory sampled from here."""
    child = subprocess.Popen([sys.executable, "-c", _CHILD, ref, cand], stdout=subprocess.PIPE,
                             text=True)
    peak: dict[str, int] = {}
    first: dict[str, int] = {}
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            now = status(child.pid)
            if now and not first:
                first.update(now)
            for k, v in now.items():
                peak[k] = max(peak.get(k, 0), v)
            time.sleep(0.005)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        out, _ = child.communicate()
    finally:  # interrupted: the child must not hold the dumps open while they are removed
        done.set()
        sampler.join()
        if child.poll() is None:
            child.kill()
            child.wait()
    if child.returncode != 0:
        raise SystemExit(f"compare failed (exit {child.returncode})")
    result = json.loads(out.strip().splitlines()[-1])
    result.update({"peak_" + k: v for k, v in peak.items()})
    return result


def _terminated(signum: int, frame: Any) -> None:
    """SIGTERM (or SIGHUP) ends the run as Ctrl-C does: through the ``finally`` that removes
    the temporary folder."""
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", default="0.5,5",
                    help="GB per dump, comma-separated (default 0.5,5)")
    ap.add_argument("--tmp", default=None, help="folder for the temporary dumps (default: "
                    "the system's temp folder)")
    ap.add_argument("--json", metavar="FILE", help="also write the figures to FILE")
    args = ap.parse_args(argv)
    sizes = [float(s) for s in args.sizes.split(",") if s.strip()]
    free = shutil.disk_usage(args.tmp or tempfile.gettempdir()).free
    need = 2 * max(sizes) * 1e9 * 1.05
    if need > free:
        ap.error(f"the largest pair needs {need / 1e9:.1f} GB and the disk has "
                 f"{free / 1e9:.1f} GB free")
    print(f"python {sys.version.split()[0]}, numpy {np.__version__}, {os.cpu_count()} CPUs, "
          f"{len(os.sched_getaffinity(0))} usable; load average {os.getloadavg()[0]:.1f}")
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, _terminated)
    figures = []
    for size in sizes:
        tmp = tempfile.mkdtemp(prefix="lockstep-cmp-", dir=args.tmp)
        try:
            t = time.perf_counter()
            ref, cand, tokens, data = write_pair(tmp, size * 1e9)
            made = time.perf_counter() - t
            r = run_compare(ref, cand)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        mbs = 2 * data / r["seconds"] / 1e6
        cpu_mbs = 2 * data / r["cpu_seconds"] / 1e6
        anon = r.get("peak_RssAnon", 0) / 1024
        fig = {"gb_per_dump": data / 1e9, "tokens": tokens, "records": len(records()),
               "largest_tensor_mb": 4 * tokens * VOCAB / 1e6, "compare_s": r["seconds"],
               "mb_per_s": mbs, "cpu_s": r["cpu_seconds"], "mb_per_cpu_s": cpu_mbs,
               "verdict": r["verdict"], "pairs": r["pairs"],
               "peak_anon_mb": anon, "peak_file_mb": r.get("peak_RssFile", 0) / 1024,
               "peak_rss_mb": r.get("peak_VmHWM", 0) / 1024, "write_s": made}
        figures.append(fig)
        print(f"\n{data / 1e9:.2f} GB per dump ({tokens} tokens, {fig['records']} records, "
              f"logits {fig['largest_tensor_mb']:.0f} MB; written in {made:.1f} s)")
        print(f"  compare {r['seconds']:.2f} s -> {mbs:.0f} MB/s of dump data "
              f"(target >= {TARGET_MBS:.0f}: {'ok' if mbs >= TARGET_MBS else 'BELOW TARGET'}); "
              f"verdict {r['verdict']}, {r['pairs']} pairs")
        print(f"  CPU time {r['cpu_seconds']:.2f} s (all threads) -> {cpu_mbs:.0f} MB per CPU "
              "second (what a busy machine's other processes do not change)")
        rss = fig["peak_rss_mb"]
        print(f"  peak RSS {rss:.0f} MB (target < {TARGET_RSS_MB:.0f}: "
              f"{'ok' if rss < TARGET_RSS_MB else 'ABOVE TARGET'}): anonymous {anon:.0f} MB "
              f"(target < {TARGET_ANON_MB:.0f}: {'ok' if anon < TARGET_ANON_MB else 'ABOVE'}), "
              f"file-mapped {fig['peak_file_mb']:.0f} MB")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(figures, f, indent=2)
            f.write("\n")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt as exc:
        print(f"\nstopped ({exc or 'Ctrl-C'}); the temporary dumps were removed",
              file=sys.stderr)
        sys.exit(130)
