"""Spreading block work over CPU threads: independent block ranges, one torch thread each."""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import torch

# Below this many super-blocks per part, splitting the work costs more than it saves.
MIN_BLOCKS_PER_PART = 1024


def split_over_threads(
    fn: Callable[..., torch.Tensor], *blocks: torch.Tensor | None, split: bool = True
) -> torch.Tensor:
    """Run a block function over ranges of blocks in parallel CPU threads, one torch thread each.

    The searches are long chains of small torch ops. Intra-op threading forks and joins at
    every op, which scales poorly and stalls outright whenever another process holds a core;
    independent block ranges in worker threads (torch releases the GIL inside ops) do not.
    Each worker sets its own torch thread count to 1 (a per-thread OpenMP setting); the
    caller's count is set again afterwards, which also restores the default new threads get.

    Args:
        fn: called as ``fn(*parts)`` on row ranges of ``blocks`` (None stays None); returns a
            tensor with one row per block.
        blocks: tensors with the same number of rows (blocks), or None.
        split: False runs everything as one part (still on one torch thread): for memory-bound
            work such as dequantization, where a second thread and the final concatenation
            cost more than they gain.

    Returns:
        The parts' results concatenated in order: the same as ``fn(*blocks)``, since every
        block is processed independently.
    """
    first = blocks[0]
    threads = torch.get_num_threads()
    nb = first.shape[0]
    if first.device.type != "cpu" or threads < 2:
        return fn(*blocks)
    # A few parts per thread so a thread slowed by another process does not hold up the rest;
    # a small input is one part, still run on one torch thread.
    parts = max(1, min(4 * threads, nb // MIN_BLOCKS_PER_PART)) if split else 1
    bounds = [nb * i // parts for i in range(parts + 1)]

    def work(i: int) -> torch.Tensor:
        torch.set_num_threads(1)
        a, b = bounds[i], bounds[i + 1]
        return fn(*(None if t is None else t[a:b] for t in blocks))

    try:
        with ThreadPoolExecutor(max_workers=min(threads, parts)) as pool:
            outs = list(pool.map(work, range(parts)))
    finally:
        torch.set_num_threads(threads)
    return outs[0] if parts == 1 else torch.cat(outs)

