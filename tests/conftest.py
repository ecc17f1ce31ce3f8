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
