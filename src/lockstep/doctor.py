"""``lockstep doctor``: the facts about this environment that a bug report needs.

Versions of lockstep and what it runs on, which engines import (and why one does not),
llama.cpp's own system info and how it was built, the CPU features the OS grants this
process, and the cache. Nothing here can take the process down: llama.cpp is asked in a
child process, so a library that crashes on load is reported as such.
"""

from __future__ import annotations

import ctypes
import json
import os
import platform
import subprocess
import sys
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

from ._version import __version__

__all__ = ["Doctor", "diagnose_environment", "LLAMA_BUILD_FILE", "amx_instructions",
           "llama_cpp_probe"]

#: where ``make setup`` notes the CMake flags it built llama-cpp-python with (in the venv)
LLAMA_BUILD_FILE = "llama-cpp-python.cmake-args"
#: distributions whose versions a bug report needs
_PACKAGES = ("numpy", "rich", "torch", "transformers", "tokenizers", "safetensors", "gguf",
             "accelerate", "llama-cpp-python")
#: CPU flags (as /proc/cpuinfo spells them) that decide which kernels can run
_CPU_FLAGS = ("sse4_2", "avx", "avx2", "fma", "f16c", "bmi2", "avx_vnni", "avx512f",
              "avx512bw", "avx512vl", "avx512_vnni", "avx512_bf16", "amx_tile", "amx_int8",
              "amx_bf16")
_ARCH_GET_XCOMP_SUPP, _ARCH_GET_XCOMP_PERM = 0x1021, 0x1022
_XFEATURE_XTILEDATA = 18
_SYS_ARCH_PRCTL = 158  # x86-64


@dataclass
class Doctor:
    """What ``diagnose_environment`` found; ``to_json`` gives it as plain data."""

    versions: dict[str, str | None] = field(default_factory=dict)
    engines: dict[str, str | None] = field(default_factory=dict)  #: engine -> None or why not
    llama_cpp: dict[str, Any] = field(default_factory=dict)
    cpu: dict[str, Any] = field(default_factory=dict)
    cache: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {"versions": self.versions, "engines": self.engines,
                "llama_cpp": self.llama_cpp, "cpu": self.cpu, "cache": self.cache}


def _versions() -> dict[str, str | None]:
    out: dict[str, str | None] = {
        "lockstep": __version__,
        "python": f"{platform.python_version()} ({platform.python_implementation()}, "
                  f"{sys.executable})",
        "platform": platform.platform(),
    }
    for name in _PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def _import_error(*modules: str) -> str | None:
    """None when every module imports, else the first failure in one line."""
    import importlib

    for module in modules:
        try:
            importlib.import_module(module)
        except Exception as exc:  # any import failure is a fact to report, not a crash
            first = (str(exc).strip().splitlines() or [""])[0]
            return f"{module}: {type(exc).__name__}: {first}"
    return None


_PROBE = r"""
import json, sys
out = {}
import llama_cpp
out["version"] = getattr(llama_cpp, "__version__", None)
out["package"] = llama_cpp.__file__
lib = getattr(getattr(llama_cpp, "llama_cpp", None), "_lib", None)
out["library"] = getattr(lib, "_name", None)
llama_cpp.llama_backend_init()
info = llama_cpp.llama_print_system_info()
out["system_info"] = info.decode("utf-8", "replace").strip() if info else None
sys.stdout.write(json.dumps(out))
"""


def llama_cpp_probe(timeout: float = 120.0) -> dict[str, Any]:
    """llama-cpp-python's version, library and ``llama_print_system_info()``, read in a child
    process; ``error`` says why not (not installed, failed to load, crashed)."""
    from .engines.isolated import describe_exit

    try:
        proc = subprocess.run([sys.executable, "-c", _PROBE], capture_output=True, text=True,
                              timeout=timeout, stdin=subprocess.DEVNULL)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return {"error": f"could not ask llama.cpp: {exc}"}
    if proc.returncode != 0:
        lines = [ln for ln in proc.stderr.strip().splitlines() if ln.strip()]
        why = lines[-1] if lines else describe_exit(proc.returncode)[0]
        if proc.returncode < 0:
            why = f"{describe_exit(proc.returncode)[0]} while loading"
        return {"error": why}
    try:
        return dict(json.loads(proc.stdout.strip().splitlines()[-1]))
    except (ValueError, IndexError):
        return {"error": f"unreadable answer from llama.cpp: {proc.stdout[-200:]!r}"}


def _system_features(info: str | None) -> dict[str, str]:
    """``AVX2 = 1 | AMX_INT8 = 0 | ...`` from llama_print_system_info() as a dict."""
    out: dict[str, str] = {}
    for part in (info or "").replace("\n", "|").split("|"):
        key, sep, value = part.partition("=")
        if sep:
            out[key.strip().split(":")[-1].strip()] = value.strip()
    return out


def amx_instructions(library: str | os.PathLike[str], timeout: float = 120.0) -> int | None:
    """How many AMX tile instructions (``ldtilecfg``, ``tdp*``, ``tileload*``...) the
    library's code holds, by ``objdump -d``; None when objdump is not available."""
    try:
        proc = subprocess.run(["objdump", "-d", "--no-show-raw-insn", os.fspath(library)],
                              capture_output=True, text=True, timeout=timeout)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if proc.returncode != 0:
        return None
    count = 0
    for line in proc.stdout.splitlines():
        _, tab, insn = line.partition("\t")
        mnemonic = insn.split(None, 1)[0] if tab and insn.strip() else ""
        if mnemonic in ("ldtilecfg", "sttilecfg", "tilerelease", "tilezero") or \
                mnemonic.startswith(("tileload", "tilestore", "tdpb", "tdpf", "tcmmr", "tcmmi")):
            count += 1
    return count


def _cpu_libraries(package_file: str | None) -> list[Path]:
    if not package_file:
        return []
    import hashlib

    libdir = Path(package_file).parent / "lib"
    unique: dict[str, Path] = {}  # a wheel holds copies, not links: libggml-cpu.so, .so.0, ...
    for path in sorted(libdir.glob("*ggml-cpu*"), key=lambda p: (len(p.name), p.name)):
        if path.is_file():
            unique.setdefault(hashlib.sha256(path.read_bytes()).hexdigest(), path)
    return sorted(unique.values())


def _llama_cpp() -> dict[str, Any]:
    probe = llama_cpp_probe()
    out: dict[str, Any] = dict(probe)
    out["features"] = _system_features(probe.get("system_info"))
    build = Path(sys.prefix) / LLAMA_BUILD_FILE
    out["build_flags"] = build.read_text().strip() if build.is_file() else None
    libs = _cpu_libraries(probe.get("package"))
    out["amx_instructions"] = {p.name: amx_instructions(p) for p in libs}
    return out


def _arch_prctl(code: int) -> int | None:
    """``arch_prctl(code, &mask)`` on x86-64 Linux: the mask, or None where it is refused."""
    if sys.platform != "linux" or platform.machine() not in ("x86_64", "AMD64"):
        return None
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        mask = ctypes.c_uint64(0)
        rc = libc.syscall(_SYS_ARCH_PRCTL, code, ctypes.byref(mask))
    except (OSError, AttributeError):
        return None
    return int(mask.value) if rc == 0 else None


def _cpu() -> dict[str, Any]:
    flags: set[str] = set()
    model = None
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() == "flags" and not flags:
                    flags = set(value.split())
                elif key.strip() == "model name" and model is None:
                    model = value.strip()
    except OSError:
        pass
    supported = _arch_prctl(_ARCH_GET_XCOMP_SUPP)
    permitted = _arch_prctl(_ARCH_GET_XCOMP_PERM)
    bit = 1 << _XFEATURE_XTILEDATA
    return {
        "model": model or platform.processor() or platform.machine(),
        "machine": platform.machine(),
        "usable_cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
        else os.cpu_count(),
        "flags": [f for f in _CPU_FLAGS if f in flags],
        "amx_tile_state": {
            "kernel_supports": None if supported is None else bool(supported & bit),
            "granted_to_this_process": None if permitted is None else bool(permitted & bit),
        },
    }


def _cache() -> dict[str, Any]:
    from .engines.hf import cache_dir  # one home for the cache folder's location

    path = cache_dir()
    size = files = 0
    if path.is_dir():
        for root, _, names in os.walk(path):
            for name in names:
                try:
                    size += os.stat(os.path.join(root, name)).st_size
                    files += 1
                except OSError:
                    pass
    return {"path": str(path), "exists": path.is_dir(), "bytes": size, "files": files}


def diagnose_environment() -> Doctor:
    """Everything ``lockstep doctor`` reports."""
    from .engines.registry import KINDS

    doc = Doctor(versions=_versions())
    # native code is tried in a child process (below), never imported here
    doc.engines = {k.kind: _import_error(*k.requires) for k in KINDS
                   if k.factory is not None and not k.native}
    doc.llama_cpp = _llama_cpp()
    doc.engines["llamacpp"] = doc.llama_cpp.get("error")
    doc.cpu = _cpu()
    doc.cache = _cache()
    return doc
