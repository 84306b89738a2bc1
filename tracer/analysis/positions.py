"""Which token positions the output figures (KL, top-1 agreement) are scored on.

``all`` (the default) scores every token. ``second-half:N`` scores what llama.cpp's
``llama-perplexity --kl-divergence`` scores with a context of N (``-c N``): the token stream is
cut into chunks of N tokens, each evaluated on its own, and in each chunk only the logits at
positions ``N/2 .. N-2`` count (``first = n_ctx/2``; the last position has no next token in its
chunk). Here a chunk is N consecutive positions of a sequence (the ``pos`` coordinate), so give
moetrace the same tokens as sequences of N tokens (``--tokens FILE``, one chunk per sequence)
and the scored positions are exactly llama-perplexity's; its figures can then be set beside
``llama-perplexity --kl-divergence``'s "Mean KLD" and "Same top p".
"""

from __future__ import annotations

import numpy as np

from moetrace.errors import MoetraceError

CHOICES = "all, second-half:N (N an even number of tokens, at least 4)"


def parse(spec: str | None) -> int | None:
    """The chunk size N of ``second-half:N``, or None for ``all`` / None.

    Raises:
        MoetraceError: an unknown form or a bad N.
    """
    if spec is None or spec == "all":
        return None
    kind, _, n = spec.partition(":")
    if kind != "second-half" or not n.isdigit() or int(n) < 4 or int(n) % 2:
        raise MoetraceError(f"invalid score positions {spec!r}; valid: {CHOICES}")
    return int(n)


def mask(pos: np.ndarray, spec: str | None) -> np.ndarray:
    """(token,) bool: the tokens scored under ``spec``, from their position ``pos`` in their sequence.

    Raises:
        MoetraceError: a bad ``spec``, or one that scores no token of the trace.
    """
    n = parse(spec)
    if n is None:
        return np.ones(pos.shape, dtype=bool)
    off = pos.astype(np.int64) % n  # position inside its chunk of n
    keep = (off >= n // 2) & (off <= n - 2)
    if not keep.any():
        raise MoetraceError(f"score positions {spec!r} select no token: the trace's sequences are at most "
                            f"{int(pos.max()) + 1} tokens long, and the first scored position is {n // 2}")
    return keep
