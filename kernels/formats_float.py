"""The plain float formats F32, F16 and BF16 (one element per "block"), bit-exact with ggml.

- F32: the float32 bytes.
- F16: ``GGML_FP32_TO_FP16``, IEEE round to nearest even (overflow to inf), as ``Tensor.to(float16)``.
- BF16: ``ggml_compute_fp32_to_bf16`` (ggml-impl.h): round to nearest even on the bit pattern, and a NaN
  keeps its top bits with the quiet bit forced (``(u >> 16) | 64``), unlike ``Tensor.to(bfloat16)``
  which writes a canonical NaN. Subnormals are kept (current ggml does not flush them).

None of them has an importance-matrix path; ``quant_weights`` is ignored.
"""

from __future__ import annotations

import torch

from moetrace.kernels.base import BlockFormat


class F32(BlockFormat):
    """IEEE single precision."""

    name = "F32"
    vec_dot_type = "F32"

    def quantize_blocks(self, x: torch.Tensor, quant_weights: torch.Tensor | None = None) -> torch.Tensor:
        """(n, 1) float32 -> (n, 4) uint8."""
        return x.to(torch.float32).contiguous().view(torch.uint8)

    def dequantize_blocks(self, q: torch.Tensor) -> torch.Tensor:
        """(n, 4) uint8 -> (n, 1) float32."""
        return q.contiguous().view(torch.float32)


class F16(BlockFormat):
    """IEEE half precision."""

    name = "F16"
    vec_dot_type = "F16"

    # Mirrors ggml_fp32_to_fp16_row (GGML_FP32_TO_FP16 per element).
    def quantize_blocks(self, x: torch.Tensor, quant_weights: torch.Tensor | None = None) -> torch.Tensor:
        """(n, 1) float32 -> (n, 2) uint8."""
        return x.to(torch.float16).contiguous().view(torch.uint8)

    # Mirrors ggml_fp16_to_fp32_row (exact).
    def dequantize_blocks(self, q: torch.Tensor) -> torch.Tensor:
        """(n, 2) uint8 -> (n, 1) float32."""
        return q.contiguous().view(torch.float16).to(torch.float32)


def _bf16_bits_exact(x: torch.Tensor) -> torch.Tensor:
    """ggml's ``ggml_compute_fp32_to_bf16`` on the bit patterns: float32 -> int16 bf16 bits, any input."""
    # int32 arithmetic wraps like ggml's uint32 arithmetic, and an arithmetic shift leaves the low
    # 16 bits that are kept equal to a logical one; the NaN test only looks at the low 31 bits.
    u = x.contiguous().view(torch.int32)
    nan = (u & 0x7FFFFFFF) > 0x7F800000
    rounded = (u + ((u >> 16) & 1) + 0x7FFF) >> 16
    return torch.where(nan, (u >> 16) | 64, rounded).to(torch.int16)  # int32 -> int16 keeps the low 16 bits


def fp32_to_bf16_bits(x: torch.Tensor) -> torch.Tensor:
    """ggml's fp32 -> bf16 conversion: float32 -> int16 bf16 bits of the same shape.

    For normal numbers, zeros and infinities torch's own conversion is the same round-to-nearest-even
    and many times faster; NaNs (whose payload ggml keeps) and subnormals (which some hardware
    converters flush) go through the exact bit formula.
    """
    x = x.to(torch.float32)
    out = x.to(torch.bfloat16).view(torch.int16)
    special = torch.isnan(x) | ((x != 0) & (x.abs() < 1.1754943508222875e-38))  # NaN or subnormal
    if bool(special.any()):
        out[special] = _bf16_bits_exact(x[special])
    return out


class BF16(BlockFormat):
    """bfloat16."""

    name = "BF16"
    vec_dot_type = "BF16"

    # Mirrors ggml_fp32_to_bf16_row_ref (ggml_compute_fp32_to_bf16 per element).
    def quantize_blocks(self, x: torch.Tensor, quant_weights: torch.Tensor | None = None) -> torch.Tensor:
        """(n, 1) float32 -> (n, 2) uint8."""
        return fp32_to_bf16_bits(x).view(torch.uint8)

    # Mirrors ggml_bf16_to_fp32_row: the bits shifted into the high half (exact; torch's bf16 -> f32
    # conversion is that shift for every bit pattern, NaN payloads included).
    def dequantize_blocks(self, q: torch.Tensor) -> torch.Tensor:
        """(n, 2) uint8 -> (n, 1) float32."""
        return q.contiguous().view(torch.bfloat16).to(torch.float32)
