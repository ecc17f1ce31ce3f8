"""The zoo's ``positions_int16`` on the long boundary model (context 33024), against
transformers: a 32768-token prompt agrees (its last position, 32767, fits an int16) and its
first decode step, position 32768, the 32769th token, diverges (it wraps to -32768).

One run of each engine on 32768 tokens and one decode step: about a minute on 2 CPU cores,
the zoo's attention taking its query rows a block at a time (a whole 32768 x 32768 score
matrix would take 17 GB)."""

from __future__ import annotations

import numpy as np
import pytest

from lockstep.engines import open_engine
from lockstep.zoo.boundary_bugs import BOUNDARY_BUGS, LONG_CONTEXT, boundary_model


@pytest.fixture
def two_threads():
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


def _logits(spec: str, ids: list[int], **options) -> tuple[list[int], np.ndarray]:
    engine = open_engine(spec, **options)
    engine.load()
    try:
        return engine.decode_logits(ids, 2)
    finally:
        engine.close()


@pytest.mark.usefixtures("two_threads")
def test_int16_positions_wrap_at_the_32769th_token(tmp_path):
    pytest.importorskip("transformers")
    bug = BOUNDARY_BUGS["positions_int16"]
    assert (bug.prompt_length, bug.steps, bug.context) == (32769, 1, LONG_CONTEXT)
    model = boundary_model(tmp_path / "long", LONG_CONTEXT)
    ids = [int(t) for t in np.random.default_rng(0).integers(0, 320, bug.prompt_length - 1)]
    ref_tokens, ref = _logits(f"hf:{model}", ids)
    _, cand = _logits(f"zoo:{model}", ids, bug="positions_int16")
    gap = np.abs(ref - cand).max(axis=-1)  # step 0: positions 0 .. 32767; step 1: 32768
    print(gap)
    assert gap[0] < 1e-5, gap
    assert gap[1] > 100 * gap[0] and gap[1] > 1e-5, gap
