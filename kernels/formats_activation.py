"""Q8_K: the activation format llama.cpp's CPU backend quantizes to for K-quant dot products.

``block_q8_K`` (292 bytes): ``float d``, ``int8 qs[256]``, ``int16 bsums[16]`` (sums of 16 consecutive
codes, used by the K-quant dots to apply the mins). Only an activation type: it is never stored in a
GGUF file and has no importance-matrix path.
"""

from __future__ import annotations

import torch

from moetrace.kernels.base import QK_K, BlockFormat
from moetrace.kernels.block_bytes import dequantize_chunked, quantize_chunked
from moetrace.kernels.ggml_float import fdiv, first_absmax, nearest_int
from moetrace.kernels.layouts import LAYOUTS

_L = LAYOUTS["Q8_K"]  # field offsets of block_q8_K


class Q8_K(BlockFormat):
    """8-bit activations in 256-element blocks with a float32 scale."""

    name = "Q8_K"
    # ggml's type_traits_cpu gives Q8_K no vec_dot (it is only ever the right-hand side of one),
    # so its vec_dot_type keeps the zero value, GGML_TYPE_F32.
    vec_dot_type = "F32"

    # Mirrors quantize_row_q8_K_ref.
    def quantize_blocks(self, x: torch.Tensor, quant_weights: torch.Tensor | None = None) -> torch.Tensor:
        """(B, 256) float32 -> (B, 292) uint8; ``quant_weights`` is ignored (no imatrix path)."""
        return quantize_chunked(self._ref, x, None, self.type_size)

    @staticmethod
    def _ref(x: torch.Tensor, _=None) -> torch.Tensor:
        B = x.shape[0]
        mx, amax = first_absmax(x, dim=1)  # (B,) signed value of largest magnitude, first one
        empty = amax == 0  # ggml writes d = 0 and zero codes
        iscale = fdiv(-127, mx)  # signed: a negative max flips the codes' sign
        q = torch.clamp(nearest_int(iscale[:, None] * x), max=127)  # MIN(127, v), stored as int8
        q = torch.where(empty[:, None], 0, q)
        bsums = q.reshape(B, 16, 16).sum(2).to(torch.int16)  # exact integer sums
        # ggml leaves bsums unwritten for an all-zero block; zero is what any caller sees as "no data".
        d = torch.where(empty, torch.zeros_like(iscale), fdiv(1, iscale))
        return torch.cat(
            [d.reshape(B, 1).view(torch.uint8), q.to(torch.int8).view(torch.uint8), bsums.view(torch.uint8)], 1
        )

    # Mirrors dequantize_row_q8_K: y = d * qs.
    def dequantize_blocks(self, q: torch.Tensor) -> torch.Tensor:
        return dequantize_chunked(self._fill, q, QK_K)

    @staticmethod
    def _fill(q: torch.Tensor, out: torch.Tensor) -> None:
        d = q[:, _L.span("d")].view(torch.float32)  # (b, 1)
        torch.mul(d, q[:, _L.span("qs")].view(torch.int8), out=out)


def q8_k_bsums(q: torch.Tensor) -> torch.Tensor:
    """The ``bsums`` field of Q8_K blocks: (B, 292) uint8 -> (B, 16) int16."""
    return q.contiguous().view(torch.int16)[:, _L.offset("bsums") // 2 : (_L.offset("bsums") + _L.size("bsums")) // 2]
