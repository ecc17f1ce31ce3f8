"""The llama.cpp library that ``make setup`` installed is portable: AMX (and AVX-512) stay off
unless the user opted in, and no AMX instruction is in its CPU backend's code. These hold on
any x86-64 machine, with or without AMX."""

from __future__ import annotations

import platform
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("llama_cpp")

from lockstep.doctor import LLAMA_BUILD_FILE, amx_instructions, llama_cpp_probe

pytestmark = pytest.mark.skipif(platform.machine() not in ("x86_64", "AMD64"),
                                reason="the build flags checked here are x86-64's")


def _opted_in() -> bool:
    """Whether this library was built with the user's own flags that allow AMX."""
    build = Path(sys.prefix) / LLAMA_BUILD_FILE
    if not build.is_file():
        pytest.skip(f"llama-cpp-python was not installed by make setup (no {build})")
    flags = build.read_text()
    return "GGML_NATIVE=ON" in flags or "GGML_AMX_TILE=ON" in flags or "GGML_AMX_INT8=ON" in flags


@pytest.fixture(scope="module")
def probe() -> dict:
    got = llama_cpp_probe()
    assert "error" not in got, got
    return got


def test_system_info_has_no_amx_or_avx512(probe):
    info = probe["system_info"]
    assert "CPU :" in info and ("AVX2 = 1" in info or "SSE3 = 1" in info), info
    if _opted_in():
        pytest.skip("built with the user's own AMX/native flags")
    features = {k.strip(): v.strip() for k, _, v in
                (p.partition("=") for p in info.split("|") if "=" in p)}
    for name, value in features.items():
        assert not ("AMX" in name and value == "1"), info
        assert not (name.startswith("AVX512") and value == "1"), info


def test_no_amx_instruction_in_libggml_cpu(probe, tmp_path):
    if shutil.which("objdump") is None or shutil.which("as") is None:
        pytest.skip("binutils (objdump, as) not installed")
    # the detector itself: an object file that holds AMX instructions is counted
    src = tmp_path / "amx.s"
    src.write_text("ldtilecfg (%rdi)\ntileloadd (%rsi,%rdx,1), %tmm0\n"
                   "tdpbssd %tmm2, %tmm1, %tmm0\ntilerelease\n")
    subprocess.run(["as", "-o", str(tmp_path / "amx.o"), str(src)], check=True)
    assert amx_instructions(tmp_path / "amx.o") == 4
    libdir = Path(probe["package"]).parent / "lib"
    libs = sorted(p for p in libdir.glob("*ggml-cpu*") if p.is_file())
    assert libs, f"no ggml CPU backend library in {libdir}"
    if _opted_in():
        pytest.skip("built with the user's own AMX/native flags")
    for lib in libs:
        assert amx_instructions(lib) == 0, lib

