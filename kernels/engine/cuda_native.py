"""llama.cpp's CUDA integer matmuls (MMQ, MMVQ) in the compiled kernels, on the CPU: kernels/csrc/engine_cuda.c.

The same arithmetic as :mod:`moetrace.kernels.engine.cuda_q8_1` (its docstring and engine_cuda.c's
list the per-block formulas read from ggml-cuda), with the kernels' own float32 accumulation over
the 32-value blocks instead of one GEMM: integer dots per block, the scale products as the
kernel forms them, one float32 accumulator per output in k order. Row ranges run on several
threads (:func:`moetrace.kernels.native._run_parts`; the C code releases the GIL).
"""

from __future__ import annotations

import numpy as np
import torch

from moetrace.kernels import native
from moetrace.kernels.engine import activations

# Weight types the compiled kernels emulate.
TYPES = ("Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "MXFP4", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K")
# Tokens x elements per thread part below which one call beats the thread handoff (as the CPU engine's).
_MIN_ELEMS_PER_PART = 1 << 16


def available() -> bool:
    """Whether the compiled kernels are built and enabled (``MOETRACE_NATIVE``, :func:`native.disabled`)."""
    return activations.compiled()


def quantize(x: torch.Tensor, type_name: str, kernel: str) -> dict[str, np.ndarray]:
    """Activations (T, n) -> q8_1 as ``kernel`` stores them for ``type_name`` weights.

    Returns:
        ``qs`` (T, n) int8 codes, ``d`` (T, n/32) float32 scales as the dots read them (fp16-rounded
        for MMVQ and MMQ's half2 layouts), ``s`` (T, n/32) float32 the fp16-rounded block sums
        (zeros where the layout keeps none). Q2_K's MMQ layout (D2S6) has one scale per 64 values
        (repeated in ``d``) and a sum per 16 values (``s`` (T, n/16); the first 96 of every 128).
    """
    t, n = x.shape
    src = np.ascontiguousarray(x.detach().to(device="cpu", dtype=torch.float32).numpy())
    sums = n // 16 if type_name == "Q2_K" and kernel == "mmq" else n // 32
    out = {"qs": np.empty((t, n), np.int8), "d": np.empty((t, n // 32), np.float32),
           "s": np.empty((t, sums), np.float32)}
    activations._cengine.cuda_quantize(type_name, kernel, src, out["qs"], out["d"], out["s"], t * n)
    return out


def matmul(a: dict[str, np.ndarray], q: np.ndarray, type_name: str, n: int, kernel: str) -> torch.Tensor:
    """(T, R) float32: the kernel's result for weight rows ``q`` (R, bytes per row) uint8 and activations
    ``a`` from :func:`quantize` (the same type and kernel)."""
    tokens, rows = a["qs"].shape[0], q.shape[0]
    w = np.ascontiguousarray(q)
    out = np.empty((tokens, rows), dtype=np.float32)

    def part(r0: int, r1: int) -> None:
        activations._cengine.cuda_matmul(type_name, kernel, w, w.shape[1], r0, r1, a["qs"], a["d"], a["s"],
                                         tokens, n, out, rows)

    if tokens and rows:
        native._run_parts(part, rows, tokens * n, _MIN_ELEMS_PER_PART)
    return torch.from_numpy(out)
