"""moetrace's compiled block kernels (C, built at install), split over CPU threads.

The C kernels in ``kernels/csrc`` produce the same bytes and floats as the torch kernels of the
``formats_*`` modules (both are bit-exact with ggml; the tests check each against ggml's golden
vectors). They are used for CPU tensors whenever they are built; where the install had no C
compiler, or ``MOETRACE_NATIVE=0`` is set, or inside :func:`disabled`, moetrace runs the torch
kernels instead.

The C functions release the GIL, so independent row (or block) ranges run on several cores from
a small thread pool: ``torch.get_num_threads()`` workers, the same budget torch itself uses.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

from moetrace.kernels.base import BLOCK_SIZES

try:
    from moetrace.kernels import _ckernels
except ImportError:  # built without a C compiler: torch kernels only
    _ckernels = None

_KERNELS: dict[str, tuple[bool, bool]] = _ckernels.kernels() if _ckernels is not None else {}
_state = threading.local()

# Below this many elements per part a single call beats handing work to the pool: the fastest
# quantizers take about 0.25 ms for 2**18 elements, dequantizing 2**20 takes about 0.2 ms, against
# some 20-50 us to hand a part to a thread and collect it (2**18 measured best for Q4_0 to Q4_K on
# a (768, 2048) matrix with 2 threads; 2**16 cost Q4_0 15%).
_MIN_QUANTIZE_ELEMS_PER_PART = 1 << 18
_MIN_DEQUANTIZE_ELEMS_PER_PART = 1 << 20

_pool: ThreadPoolExecutor | None = None
_pool_size = 0
_pool_lock = threading.Lock()


def built() -> bool:
    """Whether the compiled kernels were built with this install."""
    return _ckernels is not None


def enabled() -> bool:
    return _ckernels is not None and os.environ.get("MOETRACE_NATIVE", "1") != "0" and not getattr(_state, "off", False)


@contextlib.contextmanager
def disabled():
    """Run the torch kernels in this thread while inside the block (tests compare both paths)."""
    old = getattr(_state, "off", False)
    _state.off = True
    try:
        yield
    finally:
        _state.off = old


def has_quantize(type_name: str) -> bool:
    return enabled() and _KERNELS.get(type_name, (False, False))[0]


def has_dequantize(type_name: str) -> bool:
    return enabled() and _KERNELS.get(type_name, (False, False))[1]


def _workers() -> int:
    return max(1, torch.get_num_threads())


def _run_parts(fn, n_units: int, elems_per_unit: int, min_elems: int) -> None:
    """Call fn(start, stop) over ranges of n_units, in parallel when the work is large enough."""
    global _pool, _pool_size
    workers = _workers()
    parts = min(workers * 4, n_units, max(1, n_units * elems_per_unit // min_elems))
    if workers < 2 or parts < 2:
        fn(0, n_units)
        return
    with _pool_lock:
        if _pool is None or _pool_size != workers - 1:
            if _pool is not None:
                _pool.shutdown(wait=False)
            _pool = ThreadPoolExecutor(max_workers=workers - 1, thread_name_prefix="moetrace-kernel")
            _pool_size = workers - 1
        pool = _pool
    bounds = [n_units * i // parts for i in range(parts + 1)]
    order = itertools.count()  # next() on it is atomic under the GIL: each part is taken once

    def drain() -> None:
        # Each thread takes the next part until none are left, so a thread slowed by another
        # process does less of the work instead of holding up the rest.
        for i in iter(lambda: next(order), None):
            if i >= parts:
                return
            fn(bounds[i], bounds[i + 1])

    futures = [pool.submit(drain) for _ in range(workers - 1)]
    drain()  # the calling thread works too: one handoff fewer per call
    for f in futures:
        f.result()


def quantize(x: torch.Tensor, type_name: str, imatrix: torch.Tensor | None) -> torch.Tensor:
    """(rows, n) float32 CPU tensor -> (rows, bytes per row) uint8, by the C quantizer.

    Raises:
        FormatError: the tensor holds NaN or Inf (checked in C, on each thread's rows).
    """
    block, size = BLOCK_SIZES[type_name]
    rows, n = x.shape
    src = np.ascontiguousarray(x.detach().numpy(), dtype=np.float32)
    out = np.empty((rows, n // block * size), dtype=np.uint8)
    imat = None if imatrix is None else np.ascontiguousarray(imatrix.detach().cpu().numpy(), dtype=np.float32)

    def part(a: int, b: int) -> None:
        _ckernels.quantize(type_name, src[a:b], out[a:b], b - a, n, imat)

    try:
        _run_parts(part, rows, n, _MIN_QUANTIZE_ELEMS_PER_PART)
    except FloatingPointError:  # the C module checks every value before quantizing
        from moetrace.kernels.errors import FormatError

        raise FormatError(f"cannot quantize to {type_name}: the tensor holds NaN or Inf") from None
    return torch.from_numpy(out)


def dequantize(q: torch.Tensor, type_name: str) -> torch.Tensor:
    """(n_blocks, block bytes) uint8 CPU tensor -> (n_blocks, block size) float32, by the C dequantizer."""
    block, _ = BLOCK_SIZES[type_name]
    src = np.ascontiguousarray(q.numpy())
    nb = src.shape[0]
    out = np.empty((nb, block), dtype=np.float32)

    def part(a: int, b: int) -> None:
        _ckernels.dequantize(type_name, src[a:b], out[a:b], b - a)

    _run_parts(part, nb, block, _MIN_DEQUANTIZE_ELEMS_PER_PART)
    return torch.from_numpy(out)
