"""Limits a run is checked against before any compute: the model's positions and this machine's memory.

A run beyond the model's ``max_position_embeddings`` computes positions the model never saw (its
rotary tables extrapolate silently), so it is refused, or cut when the user asks for it. A very long
input is refused up front, naming the limit, instead of computing for minutes and then failing: the
estimate counts what the executor holds at once, every hidden-state stream of the run and one
layer's widest intermediates, plus the output logits, which are (token, vocab) per variant and mode.
"""

from __future__ import annotations

from moetrace.errors import MoetraceError

GIB = 1 << 30
# Share of the available memory a run's activations and logits may take: the layer weights of
# every variant, the interpreter and torch's workspace need the rest.
MEMORY_SHARE = 0.5


def check_positions(tokens, max_positions: int | None, truncate: bool):
    """Refuse (or, with ``truncate``, cut) sequences longer than ``max_positions``.

    Returns:
        ``tokens``, or a copy whose every sequence holds at most ``max_positions`` tokens.
    """
    if not max_positions or int(tokens.pos.max()) < max_positions:
        return tokens
    if not truncate:
        longest = int(tokens.pos.max()) + 1
        raise MoetraceError(
            f"a sequence has {longest} tokens, beyond the model's max_position_embeddings={max_positions}; "
            f"shorten it (--max-tokens {max_positions}) or pass --truncate to cut every sequence there"
        )
    keep = tokens.pos < max_positions
    return type(tokens)(tokens.ids[keep], tokens.seq[keep], tokens.pos[keep], tokens.text[keep])


def estimate_bytes(n_tokens: int, longest: int, hidden: int, vocab: int, streams: int, widest: int) -> int:
    """Bytes a run holds at once: hidden-state streams, one layer's intermediates, output logits.

    Args:
        n_tokens: tokens over all sequences.
        longest: tokens of the longest sequence (a layer runs one sequence at a time).
        hidden: hidden size.
        vocab: vocabulary size.
        streams: hidden-state streams kept between layers (reference + variants x modes).
        widest: the widest per-token intermediate of a layer (e.g. top-k x expert width).
    """
    f32 = 4
    held = streams * n_tokens * hidden * f32  # every stream's (token, hidden) between layers
    layer = longest * (4 * hidden + 2 * widest) * f32  # one sequence through one layer, a few live copies
    logits = 2 * n_tokens * vocab * f32  # one (token, vocab) head output plus its log-softmax
    return held + layer + logits


def check_memory(need: int, available: int | None, n_tokens: int) -> None:
    """Refuse a run whose estimate exceeds :data:`MEMORY_SHARE` of the available memory."""
    if available is None or need <= MEMORY_SHARE * available:
        return
    raise MoetraceError(
        f"{n_tokens} tokens need about {need / GIB:.1f} GiB for activations and logits, more than "
        f"{MEMORY_SHARE:.0%} of the {available / GIB:.1f} GiB available; trace fewer tokens "
        f"(--max-tokens, fewer prompts) or fewer variants and modes"
    )


def available_memory() -> int | None:
    """MemAvailable in bytes (Linux), or None where it cannot be read."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None
