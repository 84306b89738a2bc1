"""cuBLAS's half-precision GEMM as llama.cpp's CUDA fallback calls it: F16 inputs, F16 accumulation, F16 output.

When llama.cpp's CUDA backend does not take a quantized matmul with its integer kernels (MMQ/MMVQ;
``GGML_CUDA_FORCE_CUBLAS`` builds, GPUs without int8 tensor cores), ``ggml_cuda_op_mul_mat_cublas``
dequantizes the weights to F16 (``to_fp16_cuda``: the block's float formula, rounded to half),
converts the F32 activations to F16, and calls ``cublasGemmEx`` with ``CUBLAS_COMPUTE_16F``
(alpha and beta in half) and an F16 output, which it converts back to F32
(NUMERICS.md, "How engines compute"; read at ggml-org/llama.cpp ggml/src/ggml-cuda/ggml-cuda.cu).

What cuBLAS does inside is not documented beyond "the compute type is 16F". The model here is a
tensor-core kernel's: each ``mma.m16n8k16`` instruction adds the exact sum of 16 products (two F16
values multiply exactly into fp32) to an accumulator held in F16, so the accumulator is rounded
to F16 once per ``K_STEP`` = 16 inputs, in k order; the output is that F16 accumulator. A kernel
that splits k across thread blocks or orders the steps differently rounds at other places; the
size of the error (about sqrt(n/16) F16 roundings of the running sum) is the same.
"""

from __future__ import annotations

import torch

K_STEP = 16  # inputs per tensor-core mma (m16n8k16): the accumulator is rounded to F16 after each step
_CHUNK_ELEMS = 1 << 25  # bounds the (steps, tokens, rows) fp32 partial sums held at once


def hgemm(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """``x @ w.T`` with F16 inputs, an F16 accumulator rounded every :data:`K_STEP` inputs, F16 output.

    Args:
        x: (tokens, n) activations, any float dtype (rounded to F16 first, as ggml converts them).
        w: (rows, n) weights, any float dtype (rounded to F16: the dequantized F16 weights).

    Returns:
        (tokens, rows) float16.
    """
    t, n = x.shape
    rows = w.shape[0]
    x16 = x.to(torch.float16)
    w16 = w.to(torch.float16)
    pad = (-n) % K_STEP
    if pad:  # zero products do not change a sum
        x16 = torch.nn.functional.pad(x16, (0, pad))
        w16 = torch.nn.functional.pad(w16, (0, pad))
    steps = x16.shape[1] // K_STEP
    xs = x16.float().reshape(t, steps, K_STEP).transpose(0, 1)  # (steps, tokens, 16)
    out = torch.empty(t, rows, dtype=torch.float16, device=x.device)
    step_rows = max(1, _CHUNK_ELEMS // max(1, steps * t))
    for r in range(0, rows, step_rows):
        ws = w16[r:r + step_rows].float().reshape(-1, steps, K_STEP).permute(1, 2, 0)  # (steps, 16, r)
        # each product of two F16 values is exact in fp32; the 16 of a step are summed in fp32
        # (a tensor core sums them with at least that precision before the F16 accumulator)
        part = torch.bmm(xs, ws)  # (steps, tokens, r)
        acc = part[0].to(torch.float16)
        for s in range(1, steps):
            acc = (acc.float() + part[s]).to(torch.float16)  # one F16 rounding per step
        out[:, r:r + step_rows] = acc
    return out
