"""F32, F16 and BF16 weights on llama.cpp's CPU backend: dots in the weight's own type.

ggml's ``type_traits_cpu`` gives F16 weights the vec_dot_type F16 and BF16 weights BF16, so the
activations are rounded to the weight's type first; F32 weights take F32 activations. The generic
``ggml_vec_dot_f16`` / ``ggml_vec_dot_bf16`` sum float32 products (exact here: two 11- or 8-bit
significands) in ``ggml_float`` (double), and ``ggml_vec_dot_f32`` sums float32-rounded products in
double; the result is rounded to float32 once.

This reproduces that with float64 arithmetic whose summation order differs from ggml's sequential
one: the double sums differ by at most n * 2**-53 relative, so the float32 results agree except
where the exact sum lies within that distance of a float32 rounding boundary (a tie-breaking
difference of one ulp, never more). SIMD builds (and llamafile's sgemm, which serves these types on
x86) sum in float32 lanes instead; that is not what this emulates.
"""

from __future__ import annotations

import torch

FLOAT_TYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}
_CHUNK_ELEMS = 1 << 24


def matmul(x: torch.Tensor, q: torch.Tensor, type_name: str, n: int) -> torch.Tensor:
    """(tokens, rows) float32 from x (tokens, n) float32 and weight bytes q (rows, n * itemsize) uint8."""
    dt = FLOAT_TYPES[type_name]
    w = q.contiguous().view(dt).reshape(q.shape[0], n)  # (rows, n)
    xs = x.to(dt)  # ggml converts the activations to the vec_dot_type
    if type_name != "F32":
        # products of two F16 (or BF16) values are exact in float64, as they are in float32
        return (xs.double() @ w.double().T).float()
    rows = w.shape[0]
    step = max(1, _CHUNK_ELEMS // max(1, x.shape[0] * n))
    out = [(xs[:, None, :] * w[None, r:r + step, :]).double().sum(-1).float()  # float32 products, double sum
           for r in range(0, rows, step)]
    return torch.cat(out, 1) if out else torch.empty(x.shape[0], 0)
