"""KTransformers' Marlin re-quantization: dequantized GGUF weights -> 4-bit symmetric groups of 64 -> the kernel's weights.

Read at kvcache-ai/ktransformers 95009ea6 (archive/ktransformers/operators/linear.py ``KLinearMarlin``,
``VLinearMarlin``; ktransformers_ext/operators/custom_marlin/quantize/utils/quant_utils.py
``quantize_weights``; csrc/ktransformers_ext/cuda/gptq_marlin/gptq_marlin.cu):

- ``KLinearMarlin.load`` takes the weight as the GGUF loader dequantized it, in torch's default
  dtype (bf16 for Qwen3-MoE: custom_modeling_qwen3_moe.py sets it), whatever the file's type,
  and calls ``marlin_quantize(W.T, num_bits=4, group_size=64, act_order=False)``: per output
  column and group of 64 inputs, ``s = max|w| * (2/15)``, ``q = clamp(round(w/s) + 8, 0, 15)``,
  all as torch ops on the weight's dtype (each rounds to bf16; ``round`` is half to even). The
  largest positive element of a group, at w/s = 7.5, rounds to 8 and is clipped to code 15 (7 s).
- The kernel (``gptq_marlin_gemm``, templated on the activations' dtype) dequantizes a code as
  ``(q - 8) * s`` with ``__hmul2`` in that dtype (one rounding), multiplies on tensor cores
  (m16n8k16, fp32 accumulation) and writes the output in that dtype.

Simplifications: Marlin's tile order does not change the result of an exact product, and within
a k-slice the fp32 accumulation is what torch's bf16 matmul on the dequantized weights does (fp32
accumulation, one rounding of the output); when Marlin splits k across thread blocks it adds the
slices' partial sums through the bf16 output buffer (``global_reduce``), an extra bf16 rounding per
slice whose count depends on the GPU's SM count - not modelled. ``act_order`` is False in
KTransformers' rules, so no permutation.
"""

from __future__ import annotations

import torch

BITS = 4
GROUP = 64
MAX_Q = 2 ** BITS - 1  # 15
HALF_Q = (MAX_Q + 1) // 2  # 8: the zero point of the symmetric codes


def quantize(w: torch.Tensor, dtype: torch.dtype = torch.bfloat16) -> tuple[torch.Tensor, torch.Tensor]:
    """``marlin_quantize``'s codes and scales for a linear's weight.

    Args:
        w: (out, in) the dequantized weight, rounded to ``dtype`` first (the GGUF loader's output).
        dtype: the dtype KTransformers holds weights in (its torch default dtype).

    Returns:
        codes (out, in) int16 in 0..15, scales (out, ceil(in/64)) of ``dtype``. A row length that is
        not a multiple of 64 is padded with zeros (KTransformers pads to Marlin's tile), which no
        group's max sees.
    """
    out, k = w.shape
    pad = (-k) % GROUP
    wt = torch.nn.functional.pad(w.to(dtype), (0, pad)).reshape(out, -1, GROUP)  # (out, groups, 64)
    s = wt.abs().amax(-1, keepdim=True)  # exact in any dtype
    s = s * (2 / MAX_Q)  # `s *= 2 / max_q_val`: one rounding to dtype
    r = torch.round(wt / torch.where(s == 0, torch.ones_like(s), s))  # w / s rounds to dtype, then half-to-even
    r = torch.where(s == 0, torch.zeros_like(r), r)  # an all-zero group: every code is the zero point
    codes = (r.to(torch.int16) + HALF_Q).clamp(0, MAX_Q)
    return codes.reshape(out, -1)[:, :k], s[..., 0]


def dequantize(codes: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """The weights the Marlin kernel multiplies: ``(q - 8) * s`` rounded to ``dtype``: codes (out, in) -> (out, in)."""
    out, k = codes.shape
    s = scales.to(dtype).repeat_interleave(GROUP, dim=1)[:, :k]  # (out, in)
    return (codes - HALF_Q).to(dtype) * s  # (q - 8) is exact in bf16/fp16; the product rounds once


def roundtrip(w: torch.Tensor, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """What a Marlin linear multiplies instead of ``w``: (out, in) -> (out, in) of ``dtype``."""
    return dequantize(*quantize(w, dtype), dtype)
