"""The activation quantizers of llama.cpp's CPU backend: Q8_0, Q8_1 and Q8_K, bit-exact with ggml.

ggml quantizes the right-hand side of every quantized matmul to the weight type's ``vec_dot_type``
(``quantize_row_q8_0_ref``, ``quantize_row_q8_1_ref``, ``quantize_row_q8_K_ref``; the generic CPU
build calls exactly these). :func:`quantize` uses the compiled kernels (kernels/csrc/engine_cpu.c)
when built and enabled, the torch versions here otherwise; both give the same bytes.
"""

from __future__ import annotations

import numpy as np
import torch

from moetrace.kernels import native
from moetrace.kernels.base import BLOCK_SIZES
from moetrace.kernels.ggml_float import fdiv, fdiv_by, roundf
from moetrace.kernels.layouts import LAYOUTS

try:
    from moetrace.kernels import _cengine
except ImportError:  # built without a C compiler: torch only
    _cengine = None

ACTIVATION_TYPES = ("Q8_0", "Q8_1", "Q8_K")


def compiled() -> bool:
    """Whether the compiled engine kernels are built and enabled (``MOETRACE_NATIVE``, :func:`native.disabled`)."""
    return _cengine is not None and native.enabled()


def quantize(x: torch.Tensor, type_name: str) -> torch.Tensor:
    """Rows of activations -> ``type_name`` blocks.

    Args:
        x: (tokens, n) float32, n a multiple of the type's block size.
        type_name: ``Q8_0``, ``Q8_1`` or ``Q8_K``.

    Returns:
        (tokens, n / block * bytes per block) uint8.
    """
    block, size = BLOCK_SIZES[type_name]
    rows, n = x.shape
    if compiled():
        src = np.ascontiguousarray(x.detach().numpy(), dtype=np.float32)
        out = np.empty((rows, n // block * size), dtype=np.uint8)
        _cengine.quantize_act(type_name, src, out, rows * n)
        return torch.from_numpy(out)
    blocks = x.detach().to(torch.float32).reshape(-1, block)
    q = {"Q8_0": _q8_0, "Q8_1": _q8_1, "Q8_K": _q8_k}[type_name](blocks)
    return q.reshape(rows, n // block * size)


def _scale_and_codes(blocks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """quantize_row_q8_0_ref's d = amax/127 (float32) and codes roundf(x * (1/d)) (0 where d is 0)."""
    amax = blocks.abs().amax(1)  # (B,) exact whatever the order
    d = fdiv_by(amax, 127.0)
    nz = d != 0
    inv = torch.where(nz, fdiv(1.0, torch.where(nz, d, torch.ones_like(d))), torch.zeros_like(d))
    return d, roundf(blocks * inv[:, None])  # (B,), (B, 32)


def _q8_0(blocks: torch.Tensor) -> torch.Tensor:
    """(B, 32) float32 -> (B, 34) uint8: fp16 d, int8 qs (quantize_row_q8_0_ref)."""
    d, q = _scale_and_codes(blocks)
    return torch.cat([d.to(torch.float16).view(torch.uint8).reshape(-1, 2),
                      q.to(torch.int8).view(torch.uint8)], 1)


def _q8_1(blocks: torch.Tensor) -> torch.Tensor:
    """(B, 32) float32 -> (B, 36) uint8: fp16 d, fp16 s = d * sum(qs) with the float32 d, int8 qs."""
    d, q = _scale_and_codes(blocks)
    s = q.to(torch.int32).sum(1).to(torch.float32) * d  # the sum is an exact integer, then one product
    return torch.cat([d.to(torch.float16).view(torch.uint8).reshape(-1, 2),
                      s.to(torch.float16).view(torch.uint8).reshape(-1, 2),
                      q.to(torch.int8).view(torch.uint8)], 1)


def _q8_k(blocks: torch.Tensor) -> torch.Tensor:
    """(B, 256) float32 -> (B, 292) uint8 (quantize_row_q8_K_ref, moetrace's Q8_K format)."""
    from moetrace.kernels.formats_activation import Q8_K

    return Q8_K._ref(blocks)


# -- reading activation blocks back ----------------------------------------------------------


def fields(q: torch.Tensor, type_name: str) -> dict[str, torch.Tensor]:
    """The fields of activation blocks as numbers.

    Args:
        q: (tokens, n_blocks * bytes) uint8.

    Returns:
        ``qs`` (tokens, n_blocks, block) int8, ``d`` (tokens, n_blocks) float32 and, for Q8_1,
        ``s`` (tokens, n_blocks) float32; for Q8_K ``bsums`` (tokens, n_blocks, 16) int16.
    """
    lay = LAYOUTS[type_name]
    t = q.shape[0]
    b = q.reshape(t, -1, lay.bytes)
    out = {"qs": b[..., lay.span("qs")].contiguous().view(torch.int8)}
    if type_name == "Q8_K":
        out["d"] = b[..., lay.span("d")].contiguous().view(torch.float32)[..., 0]
        out["bsums"] = b[..., lay.span("bsums")].contiguous().view(torch.int16)
    else:
        out["d"] = b[..., lay.span("d")].contiguous().view(torch.float16)[..., 0].float()
    if type_name == "Q8_1":
        out["s"] = b[..., lay.span("s")].contiguous().view(torch.float16)[..., 0].float()
    return out
