#!/usr/bin/env python
"""How much slower a forward runs while lockstep records every module output to disk.

A randomly initialised Llama with SmolLM2-135M's shape (30 layers, hidden 576, vocab 49152)
runs a prefill (batch 1, float32, sdpa, eval, no_grad) on CPU, three ways:

* plain:        ``model(ids)``
* lockstep:     ``with lockstep.record(dir) as rec: rec.watch(model); model(ids)``, timed from
                opening the recording to the end of its close (the dump complete on disk);
* hf-debugger:  ``with model_addition_debugger_context(model, debug_path=dir, use_repr=False):
                model(ids)`` from transformers.model_debugging_utils, which writes full tensors
                as one safetensors file per tensor.

The three run interleaved, ``--repeats`` times each after ``--warmup`` rounds, each recording
into a new directory under a temporary folder (deleted between repeats, outside the timed
region). Medians are printed, and the ratios lockstep/plain and lockstep/hf-debugger; the
ratio is also given as the median of each round's own recorded/plain ratio, which a shared
machine's slow spells disturb less.

Where the extra time goes is measured in the same rounds, by two more runs:

* hooks:        the same forward with a no-op forward hook on every module: torch's hook
                dispatch alone;
* open_close:   a recording that opens, installs its hooks and closes, with no forward;
* instrumented: a recording whose writer times its own parts: the data handed to the OS
                (``DumpWriter._write_all``: the one copy, into the page cache), the copies
                into its staging buffer, and the index (its lines formed, and written at
                the end of the step).

What is left of recorded - plain is the Python run per capture (the recorder's own code).

* floor:        the least any recorder of these outputs could cost here: a forward hook on
                every module that hands each output tensor's bytes to the OS with one
                ``write`` (the same tensors lockstep stores: one written once however many
                modules return it), into blocks reserved ahead as lockstep reserves them, and
                nothing else (no index, no names, no checks). Timed like the recording, from
                installing its hooks to closing its file.
The CPU model, the core count and torch's thread count are printed with the figures.

On a busy shared machine elapsed times swing by several times from one forward to the next;
``--clock cpu`` times the CPU time of the thread that runs the forward instead, with torch
on that one thread, which other processes disturb far less (the kernel's copy into the page
cache is that thread's system time, so it counts).

    .venv/bin/python benchmarks/capture_overhead.py                # the full 135M shape
    .venv/bin/python benchmarks/capture_overhead.py --layers 2 --repeats 3   # quick check
    .venv/bin/python benchmarks/capture_overhead.py --clock cpu --repeats 9 --no-hf  # busy machine
"""

from __future__ import annotations

import argparse
import ctypes
import json
import math
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
import weakref
from typing import Any, Callable, ClassVar

import torch

import lockstep
from _timing import dir_stats, settle

TARGET_RATIO = 1.10


def smollm2_135m_config(layers: int) -> Any:
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=layers,
        num_attention_heads=9, num_key_value_heads=3, tie_word_embeddings=True,
        rope_theta=100000.0, max_position_embeddings=8192, rms_norm_eps=1e-5,
        hidden_act="silu", attn_implementation="sdpa",
    )


def build_model(layers: int) -> Any:
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(smollm2_135m_config(layers)).to(torch.float32).eval()
    return model


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


class PartTimer:
    """Wraps DumpWriter's parts with timers while a recording is instrumented. Each part's
    time is its own: a part called inside another (the stage written out by a flush) is
    taken out of the outer one."""

    PARTS: ClassVar[dict[str, tuple[str, ...]]] = {
        "write": ("_write_all",), "stage copy": ("_put_data",),
        "index": ("_tensor_line", "flush")}

    def __init__(self, clock: Callable[[], float] = time.perf_counter) -> None:
        from lockstep.store.writer import DumpWriter

        self.clock = clock
        self.cls = DumpWriter
        self.totals = dict.fromkeys(self.PARTS, 0.0)
        self.saved: dict[str, Any] = {}
        self.inner: list[float] = []  # per open timed call: time spent in nested timed calls

    def __enter__(self) -> PartTimer:
        for part, names in self.PARTS.items():
            for name in names:
                orig = getattr(self.cls, name, None)
                if orig is not None:  # (an older lockstep may lack a part)
                    self.saved[name] = orig
                    setattr(self.cls, name, self._timed(part, orig))
        return self

    def _timed(self, part: str, orig: Callable[..., Any]) -> Callable[..., Any]:
        totals, inner, clock = self.totals, self.inner, self.clock

        def timed(*args: Any, **kwargs: Any) -> Any:
            inner.append(0.0)
            t = clock()
            try:
                return orig(*args, **kwargs)
            finally:
                dt = clock() - t
                totals[part] += dt - inner.pop()
                if inner:
                    inner[-1] += dt
        return timed

    def __exit__(self, *exc: object) -> None:
        for name, orig in self.saved.items():
            setattr(self.cls, name, orig)


class FloorWriter:
    """The least a recorder of every module's outputs could do: each output tensor's bytes
    handed to the OS with one ``write``, once per tensor (identity and version, as lockstep
    stores a tensor returned by two modules once), into blocks reserved ahead as lockstep's
    writer reserves them."""

    def __init__(self, path: str) -> None:
        from lockstep.store.prealloc import preallocator

        os.makedirs(path)
        self.fd = os.open(os.path.join(path, "data.bin"), os.O_WRONLY | os.O_CREAT, 0o644)
        self.prealloc = preallocator(self.fd)
        self.end = 0
        self.seen: dict[int, tuple[Any, int]] = {}

    def __enter__(self) -> FloorWriter:
        return self

    def hook(self, module: Any, args: Any, output: Any) -> None:
        from lockstep.capture.tensors import leaves

        for _, t in leaves(output):
            known = self.seen.get(id(t))
            if known is not None and known[0]() is t and known[1] == t._version:
                continue
            self.seen[id(t)] = (weakref.ref(t), t._version)
            n = t.nbytes
            if n:
                if self.prealloc is not None:
                    self.prealloc.ahead(self.end + n)
                data = t if t.is_contiguous() else t.contiguous()
                os.write(self.fd, (ctypes.c_ubyte * n).from_address(data.data_ptr()))
                self.end += n

    def __exit__(self, *exc: object) -> None:
        if self.prealloc is not None:
            self.prealloc.release(self.end)
        os.close(self.fd)


def mib(n: float) -> str:
    return f"{n / (1 << 20):.1f} MiB"


def ms(t: float) -> str:
    return f"{t * 1e3:8.1f} ms"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeats", type=int, default=20, help="timed runs of each (default 20)")
    ap.add_argument("--warmup", type=int, default=3, help="untimed rounds first (default 3)")
    ap.add_argument("--tokens", type=int, default=32, help="prefill length (default 32)")
    ap.add_argument("--layers", type=int, default=30, help="decoder layers (default 30)")
    ap.add_argument("--no-hf", action="store_true", help="skip transformers' debugger")
    ap.add_argument("--no-stats", action="store_true", help="skip the stats=True phase")
    ap.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                    help="wall: elapsed time (default); cpu: the CPU time of the thread that "
                    "runs the forward, with torch on that one thread (--threads 1): what "
                    "recording costs, undisturbed by other processes of a busy machine")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's "
                    "own choice)")
    ap.add_argument("--copies", choices=("auto", "queue"), default="auto",
                    help="the recording's copies: auto (each capture written on the forward's "
                    "thread, default) or queue (copied into pooled buffers and written by the "
                    "writer thread: with --clock cpu its write is not counted)")
    ap.add_argument("--tmp", default=None, help="folder for the temporary dumps (default: "
                    "the system's temp folder)")
    ap.add_argument("--json", metavar="FILE", help="also write the figures to FILE")
    args = ap.parse_args(argv)
    if args.repeats < 1:
        ap.error("--repeats must be at least 1")

    from transformers.model_debugging_utils import model_addition_debugger_context

    t0 = time.perf_counter()
    model = build_model(args.layers)
    n_params = sum(p.numel() for p in model.parameters())
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(0, model.config.vocab_size, (1, args.tokens), generator=gen)
    build_s = time.perf_counter() - t0
    print(f"model: Llama, SmolLM2-135M shape, {args.layers} layers, {n_params / 1e6:.1f}M params, "
          f"float32, attn={model.config._attn_implementation}; built in {build_s:.1f} s")
    if args.clock == "cpu":  # all the work on the timed thread: its CPU time is the cost
        if args.threads > 1:
            ap.error("--clock cpu times one thread: use it with --threads 1")
        args.threads = 1
        args.no_stats = True  # (stats=True computes them on a writer thread: not timed here)
    if args.threads:
        torch.set_num_threads(args.threads)
    clock = time.thread_time if args.clock == "cpu" else time.perf_counter
    print(f"input: batch 1, {args.tokens} tokens; torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads; copies={args.copies}; "
          f"lockstep {lockstep.__version__}; "
          f"python {platform.python_version()}")
    print(f"machine: {cpu_model()}, {os.cpu_count()} cores, "
          f"{len(os.sched_getaffinity(0))} usable; load average "
          f"{', '.join(f'{x:.1f}' for x in os.getloadavg())} at the start")

    tmp = tempfile.mkdtemp(prefix="lockstep-bench-", dir=args.tmp)
    last: dict[str, str] = {}  # kind -> the last output folder, kept for the size figures
    counter = [0]

    def new_dir(kind: str) -> str:
        old = last.get(kind)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
        counter[0] += 1
        path = os.path.join(tmp, f"{kind}-{counter[0]}")
        last[kind] = path
        return path

    def plain() -> float:
        t = clock()
        model(ids)
        return clock() - t

    def recorded(kind: str, *, forward: bool = True, stats: bool = False) -> float:
        path = new_dir(kind) + ".lsd"
        last[kind] = path  # so that new_dir removes it: dirty pages left behind throttle
        t = clock()
        with lockstep.record(path, stats=stats, copies=args.copies) as rec:
            rec.watch(model)
            if forward:
                model(ids)
        return clock() - t

    def with_hooks() -> float:
        handles = [m.register_forward_hook(lambda m, a, o: None) for m in model.modules()]
        t = clock()
        model(ids)
        dt = clock() - t
        for h in handles:
            h.remove()
        return dt

    def floor() -> float:
        path = new_dir("floor")
        t = clock()
        with FloorWriter(path) as w:
            handles = [m.register_forward_hook(w.hook) for m in model.modules()]
            model(ids)
            for h in handles:
                h.remove()
        return clock() - t

    parts: dict[str, list[float]] = {k: [] for k in PartTimer.PARTS}

    def instrumented() -> float:
        with PartTimer(clock) as timer:
            dt = recorded("instrumented")
        for k, v in timer.totals.items():
            parts[k].append(v)
        return dt

    def with_hf() -> float:
        path = new_dir("hf")
        t = clock()
        with model_addition_debugger_context(model, debug_path=path, do_prune_layers=True,
                                             use_repr=False):
            model(ids)
        return clock() - t

    runs: dict[str, Callable[[], float]] = {
        "plain": plain, "lockstep": lambda: recorded("lockstep"), "hooks": with_hooks,
        "instrumented": instrumented, "open_close": lambda: recorded("empty", forward=False),
        "floor": floor}
    if not args.no_hf:
        runs["hf_debugger"] = with_hf
    # stored statistics in a second phase of their own: the writer thread's late page-cache
    # writes would slow the runs interleaved with them
    phases = [runs]
    if not args.no_stats:
        phases.append({"plain_stats": plain,
                       "lockstep_stats": lambda: recorded("stats", stats=True)})
    times: dict[str, list[float]] = {k: [] for phase in phases for k in phase}
    t0 = time.perf_counter()
    try:
        with torch.no_grad():
            settle_s = settle(plain)
            for phase in phases:
                for i in range(args.warmup + args.repeats):
                    if i == args.warmup and "instrumented" in phase:  # timed rounds' parts
                        for v in parts.values():
                            v.clear()
                    for kind, fn in phase.items():  # interleaved: drift hits them alike
                        dt = fn()
                        if i >= args.warmup:
                            times[kind].append(dt)
        bench_s = time.perf_counter() - t0

        med = {k: statistics.median(v) for k, v in times.items()}
        lo = {k: min(v) for k, v in times.items()}
        dump_bytes, _ = dir_stats(last["lockstep"])
        with lockstep.open_dump(last["lockstep"]) as dump:
            n_records = len(dump)
            data_bytes = sum(r.nbytes or 0 for r in dump)
            complete = dump.complete
        hf_bytes = hf_files = hf_tensors = 0
        if "hf" in last:
            hf_bytes, hf_files = dir_stats(last["hf"])
            hf_tensors = sum(1 for n in os.listdir(last["hf"]) if n.endswith(".safetensors"))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    ratio = med["lockstep"] / med["plain"]
    spread = max(times["plain"]) / min(times["plain"])
    if settle_s is None or spread > 1.5:
        print(f"\nWARNING: the machine is noisy (plain forward {ms(min(times['plain'])).strip()}"
              f" to {ms(max(times['plain'])).strip()}); the figures may not be comparable")
    print(f"\n{'CPU time of the forward thread' if args.clock == 'cpu' else 'wall time'}: "
          f"median of {args.repeats} (after {args.warmup} warmup), min in brackets:")
    print(f"  plain forward        {ms(med['plain'])}   [{ms(lo['plain']).strip()}]")
    print(f"  lockstep record      {ms(med['lockstep'])}   [{ms(lo['lockstep']).strip()}]"
          f"   {n_records} records, dump {mib(dump_bytes)} on disk "
          f"({mib(data_bytes)} tensor data), complete={complete}")
    verdict = "ok" if ratio <= TARGET_RATIO else "ABOVE TARGET"
    print(f"  ratio lockstep/plain {ratio:8.3f}      (target <= {TARGET_RATIO}: {verdict})")
    floor_ratio = med["floor"] / med["plain"]
    print(f"  floor                {ms(med['floor'])}   [{ms(lo['floor']).strip()}]   bare "
          "hooks writing the same tensors, nothing else")
    print(f"  ratio floor/plain    {floor_ratio:8.3f}      (what writing the outputs alone "
          "costs on this machine)")
    round_ratios = sorted(r / p for r, p in zip(times["lockstep"], times["plain"]))
    paired = statistics.median(round_ratios)
    print(f"  ratio, median of the {len(round_ratios)} rounds' own {paired:6.3f}      (range "
          f"{round_ratios[0]:.3f}-{round_ratios[-1]:.3f})")
    # where recorded - plain goes: each part's median over the timed rounds
    extra = med["lockstep"] - med["plain"]
    split = {"hook dispatch (torch)": med["hooks"] - med["plain"],
             "open, watch, close (once per recording)": med["open_close"]}
    split.update({f"{k} ({what})": statistics.median(parts[k]) for k, what in (
        ("write", "data handed to the OS: the copy into the page cache"),
        ("stage copy", "small records copied into the staging buffer"),
        ("index", "lines formed, and written at the step's end"))})
    split["Python per capture, and the cache misses the copies cause the forward (the rest)"] = \
        extra - sum(split.values())
    print(f"\nwhere the {extra * 1e3:.1f} ms go (medians; {n_records} records):")
    for k, v in split.items():
        print(f"  {v * 1e3:7.2f} ms  {v / n_records * 1e6:6.1f} us/record  {k}")
    print(f"  (the instrumented recording took {ms(med['instrumented']).strip()}: its timers "
          "cost a little)")
    ratio_stats = math.nan
    if not args.no_stats:
        ratio_stats = med["lockstep_stats"] / med["plain_stats"]
        print(f"\n  lockstep, stats=True {ms(med['lockstep_stats'])}   "
              f"[{ms(lo['lockstep_stats']).strip()}]   (statistics stored while recording)")
        print(f"  ratio stats=True/plain {ratio_stats:6.3f}      (its own phase; plain "
              f"{ms(med['plain_stats']).strip()} there)")
    figures: dict[str, Any] = {
        "layers": args.layers, "tokens": args.tokens, "repeats": args.repeats,
        "warmup": args.warmup, "params": n_params, "threads": torch.get_num_threads(),
        "torch": torch.__version__, "clock": args.clock, "lockstep": lockstep.__version__,
        "plain_spread": spread, "settled": settle_s is not None,
        "plain_ms": med["plain"] * 1e3, "lockstep_ms": med["lockstep"] * 1e3,
        "plain_min_ms": lo["plain"] * 1e3, "lockstep_min_ms": lo["lockstep"] * 1e3,
        "ratio_lockstep_plain": ratio, "target_ratio": TARGET_RATIO,
        "ratio_median_of_rounds": paired, "floor_ms": med["floor"] * 1e3,
        "ratio_floor_plain": floor_ratio, "cpu": cpu_model(), "cores": os.cpu_count(),
        "split_ms": {k: v * 1e3 for k, v in split.items()},
        "lockstep_stats_ms": med.get("lockstep_stats", math.nan) * 1e3,
        "ratio_stats_plain": ratio_stats,
        "lockstep_records": n_records, "lockstep_dump_bytes": dump_bytes,
        "lockstep_data_bytes": data_bytes,
        "times_ms": {k: [t * 1e3 for t in v] for k, v in times.items()},
    }
    if "hf_debugger" in med:
        hf_ratio = med["lockstep"] / med["hf_debugger"]
        print(f"  hf debugger          {ms(med['hf_debugger'])}   "
              f"[{ms(lo['hf_debugger']).strip()}]   {hf_tensors} safetensors files, "
              f"{mib(hf_bytes)} on disk ({hf_files} files)")
        print(f"  ratio lockstep/hf    {hf_ratio:8.3f}")
        print("  (not the same work: the hf debugger saves every module's tensor inputs, only "
              "leaf\n   modules' outputs, one safetensors file per tensor, plus mean/std/min/max "
              "reprs;\n   lockstep saves every module's outputs, statistics left to the reader, "
              "into one data "
              "file)")
        figures.update({
            "hf_debugger_ms": med["hf_debugger"] * 1e3,
            "hf_debugger_min_ms": lo["hf_debugger"] * 1e3,
            "ratio_lockstep_hf_debugger": hf_ratio,
            "hf_debugger_tensor_files": hf_tensors, "hf_debugger_bytes": hf_bytes,
        })
    print(f"\nbenchmark took {bench_s:.1f} s (+{build_s:.1f} s building the model)")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(figures, f, indent=2)
            f.write("\n")
        print(f"figures written to {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
