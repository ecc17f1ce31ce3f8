"""The diagnosis rules, in the order they run, and the kinds they give.

The most specific explanation wins, so the order matters:

- ``batch`` (kinds ``batch_kv_shared``, ``batch_leak``, ``batch_positions``,
  ``batch_mask``): only for a sequence split from a batched run: two sequences share KV
  slots, one reads another's slots or takes its token, left padding moved its positions,
  or padding was let into its attention.
- ``sampling``: the logits agree, the token does not: the candidate's chosen token is not
  the argmax of its own logits, or the two sides chose different tokens.
- ``nan``: NaN/Inf appear at this tensor on one side only.
- ``zeros``: the candidate is all zeros (or largely) where the reference is not.
- ``stale``: the candidate equals its own value at the previous step; the reference moved.
- ``layout``: a transpose, a (T, H, D) <-> (H, T, D) reordering or the interleaved <->
  half-split RoPE order of the candidate matches the reference.
- ``blocked_norm``: cand/ref is one factor per block of b elements (b < head_dim), the
  factors differ between blocks, or equal rms(head)/rms(block) of the norm's input.
- ``norm_eps``: each row of a norm's output is one factor of the reference's, and the
  factors follow the rows' mean squares as another epsilon makes them.
- ``moe``: a mixture-of-experts layer: which tokens chose other experts, whether the router
  logits agree and the weights sum to 1, which experts' rows differ, whether the shared
  expert is in the sum.
- ``chunk``: a prefill fed in chunks (joined into one step) agrees on its first chunk and
  departs at a later one: the mask or cached keys of a later chunk, or its positions.
- ``attention`` (kinds ``softcap``, ``window``, ``scale``): attention recomputed from the
  reference's q, k, v reproduces the candidate with the soft cap left out, another window,
  or another score scale.
- ``scale``: the embedding or q/k after RoPE is the reference's times one constant
  (√hidden, YaRN's attention factor).
- ``embedding``: token ids or embeddings differ at prefill.
- ``decode``: prefill agrees, a decode step does not: the token fed, its position, or the
  KV cache, by where the divergence is and which of its inputs agree.
- ``logits``: the final norm agrees, the logits do not.
- ``rope``: q/k before RoPE agree, after RoPE they do not.
- ``op``: the fallback: an op's output differs while its input agrees.

Adding a rule: a module beside these holding one ``@rule("kind")`` function, and its line
here. ``KINDS`` and the zoo's list of diagnoses follow from ``RULES``.
"""

from __future__ import annotations

from .act import act
from .attention import attention
from .batch import batch
from .blocked_norm import blocked_norm
from .chunk import chunk
from .decode import decode
from .embedding import embedding
from .layout import layout
from .logits import logits
from .model import Rule
from .moe import moe
from .nan import nan
from .norm_eps import norm_eps
from .op import op
from .rope import rope
from .sampling import sampling
from .scale import scale
from .stale import stale
from .zeros import zeros

__all__ = ["RULES", "KINDS"]

#: every rule, in the order they run: the first that gives a Diagnosis wins
RULES: tuple[Rule, ...] = (
    batch,
    sampling,
    nan,
    zeros,
    stale,
    layout,
    blocked_norm,
    norm_eps,
    moe,
    chunk,
    attention,
    act,
    scale,
    embedding,
    decode,
    logits,
    rope,
    op,
)

#: every kind of Diagnosis, in the order the rules run
KINDS: tuple[str, ...] = tuple(dict.fromkeys(kind for r in RULES for kind in r.kinds))
