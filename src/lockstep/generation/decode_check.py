"""Decode against the engine's own prefill: a decode-only bug with no reference noise.

An engine's first decode step (the prompt in its KV cache, one token fed) must give the same
next-token distribution as a prefill of the prompt plus that token: the same model, the same
positions, only the KV cache path differs. A wrong position, a wrong KV slot or a wrong fed
token breaks that and nothing else does, so it is measured against the engine itself, where
no quantization or precision difference with the reference hides it: a correct float32 engine
agrees with itself to about 1e-11 nats, llama.cpp and bfloat16 to about 1e-3.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .metrics import kl_divergence

__all__ = ["DecodeCheck", "check_decode"]

#: KL (nats) a float32/float64 engine's decode may differ from its own prefill by
FLOAT_FLOOR = 1e-4
#: the same for reduced precision or quantized compute (bfloat16 measured up to 2.2e-3)
REDUCED_FLOOR = 5e-3
#: decode may differ from its own prefill by this many times the prefill's KL from the
#: reference (the engine's own numerical noise, as the reference sees it)
NOISE_FACTOR = 100.0
#: a prefill this close to the reference's (KL, nats) is full-precision agreement, whatever
#: the engine declares or leaves undeclared (float32 engines measure about 1e-12)
FULL_PRECISION_PREFILL_KL = 1e-7
#: the floor for an engine measured at full precision: its decode agrees with its own
#: prefill to about 1e-11 when correct
MEASURED_FLOOR = 1e-8


@dataclass(frozen=True)
class DecodeCheck:
    """The candidate's first decode step against its own prefill of the same tokens."""

    kl: float  #: KL(own prefill || decode) at decode step 1, nats
    limit: float  #: above this, decode is broken
    prefill_kl: float  #: KL(reference || candidate) at the prefill (step 0)

    @property
    def broken(self) -> bool:
        return self.kl > self.limit


def check_decode(own_prefill_row: np.ndarray, decode_row: np.ndarray, *, prefill_kl: float,
                 full_precision: bool) -> DecodeCheck:
    """Compare the logits of a prefill of prompt + token with those of decoding the token.

    The limit comes from what was measured: an engine whose prefill agrees with the
    reference to full precision (``FULL_PRECISION_PREFILL_KL``) is held to
    ``MEASURED_FLOOR`` whatever it declares (or leaves undeclared); otherwise the declared
    precision (``full_precision``) picks the floor. Either way the limit is at least
    ``NOISE_FACTOR`` times the prefill's measured KL."""
    kl = float(kl_divergence(np.asarray(own_prefill_row, np.float64)[None],
                             np.asarray(decode_row, np.float64)[None])[0])
    if prefill_kl <= FULL_PRECISION_PREFILL_KL:
        floor = MEASURED_FLOOR
    else:
        floor = FLOAT_FLOOR if full_precision else REDUCED_FLOOR
    return DecodeCheck(kl, max(floor, NOISE_FACTOR * prefill_kl), prefill_kl)
