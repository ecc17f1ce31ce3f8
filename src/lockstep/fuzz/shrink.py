"""Shrinking a failing input to the smallest that still fails, as Hypothesis shrinks a
counterexample: fewer decode steps, a shorter prompt, simpler token ids (runs of 0, then
each id made smaller), each change kept only when the input still fails the same way. No
randomness: the same failing input always shrinks to the same minimal one."""

from __future__ import annotations

from collections.abc import Callable, Iterator

from .inputs import FuzzInput

__all__ = ["shrink"]


def _fewer_steps(x: FuzzInput) -> Iterator[FuzzInput]:
    for steps in sorted({1, x.steps // 2, x.steps - 1}):
        if 1 <= steps < x.steps:
            yield FuzzInput(x.tokens, steps, x.why)
    if x.steps > 1:  # a decode step moved into the prompt: the same positions, fewer steps
        yield FuzzInput(x.tokens + (0,), x.steps - 1, x.why)


def _shorter(x: FuzzInput) -> Iterator[FuzzInput]:
    n = len(x.tokens)
    k = n // 2
    while k >= 1:  # cut k tokens off the end, then off the start
        yield FuzzInput(x.tokens[: n - k], x.steps, x.why)
        yield FuzzInput(x.tokens[k:], x.steps, x.why)
        k //= 2


def _simpler(x: FuzzInput) -> Iterator[FuzzInput]:
    n = len(x.tokens)
    if any(x.tokens):
        yield FuzzInput((0,) * n, x.steps, x.why)
    size = n // 2
    while size >= max(1, n // 16):  # zero a chunk, largest chunks first
        for start in range(0, n, size):
            chunk = x.tokens[start:start + size]
            if any(chunk):
                yield FuzzInput(x.tokens[:start] + (0,) * len(chunk) + x.tokens[start + size:],
                                x.steps, x.why)
        size //= 2


def _smaller_values(x: FuzzInput) -> Iterator[FuzzInput]:
    for i, t in enumerate(x.tokens):  # each token id toward 0: 1, then half of it
        for smaller in sorted({1, t // 2} - {0}):
            if smaller < t:
                yield FuzzInput(x.tokens[:i] + (smaller,) + x.tokens[i + 1:], x.steps, x.why)


#: what one check of token ids may cost before the token moves count it against their
#: own limit: the positions of a short model's whole context
TOKEN_CHECK_POSITIONS = 512


def _ends_cut_by_one(x: FuzzInput) -> list[FuzzInput]:
    """The prompt one token shorter at either end: if neither still fails, no longer cut is
    tried (a failure that needs n tokens rarely comes back at fewer)."""
    n = len(x.tokens)
    return [FuzzInput(x.tokens[:n - 1], x.steps, x.why), FuzzInput(x.tokens[1:], x.steps, x.why)]


def shrink(start: FuzzInput, still_fails: Callable[[FuzzInput], bool], *,
           budget: int = 80) -> tuple[FuzzInput, int]:
    """The smallest input (``FuzzInput.key``) reached from ``start`` by steps that each keep
    ``still_fails`` true, and the checks it took (at most ``budget``).

    Cost-aware for long inputs, where every check is a long prefill on both engines: the
    prompt of an input over ``TOKEN_CHECK_POSITIONS`` positions is cut by halves, quarters,
    ... only when cutting one token at either end still fails (a failure that shows at some
    lengths and not others, as a block boundary's, is still cut to its smallest on a short
    input), and the
    token moves (zeroed runs, smaller ids) stop once they have run as many positions as
    ``budget`` checks of ``TOKEN_CHECK_POSITIONS`` would (never, for inputs that short)."""
    best, checks = start, 0
    known: dict[tuple[tuple[int, ...], int], bool] = {(start.tokens, start.steps): True}
    token_positions = 0

    def fails(candidate: FuzzInput) -> bool:
        nonlocal checks
        ident = (candidate.tokens, candidate.steps)
        if ident not in known:
            checks += 1
            known[ident] = still_fails(candidate)
        return known[ident]

    improved = True
    while improved and checks < budget:
        improved = False
        for moves in (_fewer_steps, _shorter, _simpler, _smaller_values):
            if moves is _shorter and best.positions > TOKEN_CHECK_POSITIONS and not any(
                    fails(c) for c in _ends_cut_by_one(best)
                    if c.key < best.key and (checks < budget or (c.tokens, c.steps) in known)):
                continue
            for candidate in moves(best):
                ident = (candidate.tokens, candidate.steps)
                if candidate.key >= best.key or known.get(ident) is False:
                    continue
                if checks >= budget and ident not in known:
                    return best, checks
                if moves in (_simpler, _smaller_values) and ident not in known:
                    if token_positions + candidate.positions > \
                            budget * TOKEN_CHECK_POSITIONS:
                        break  # the token moves' share is spent: keep these ids
                    token_positions += candidate.positions
                if fails(candidate):
                    best, improved = candidate, True
                    break  # start the pass again from the smaller input
            if improved:
                break
    return best, checks
