"""Named tolerance levels for the kernel tests: how far dequantize(quantize(x)) may be from x, per GGML type.

Two measures, as ggml's ``test-backend-ops`` does, instead of ad-hoc ``atol`` in each test:

- ``nmse``: normalized error ``mse(x, y) / mse(x, 0)`` on Gaussian data (the quality a format is known for).
- ``rel`` and ``atol``: the worst element, ``|y - x| <= rel * amax + atol``, where ``amax`` is the largest
  magnitude in the element's block (super-block for K-quants). ``atol`` covers blocks so small that the
  fp16 scale is subnormal or underflows: twice the smallest fp16 step (2**-24, so four times the rounding
  error of d) times the largest integer multiplier the format applies to d (code times sub-scale).
- ``rel_imatrix``: the same bound on the importance-matrix path (weights in [0.125, 10]), where the search
  may trade the error of an element with a small weight for others.

Levels were measured on Gaussian, Student-t, sparse, outlier, constant, tiny and fp16-range data and then
given some headroom; a format that drifts past them has a bug, not bad luck.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

FP16_STEP = 2.0**-24  # smallest positive fp16 (subnormal) value


@dataclass(frozen=True)
class Level:
    """A format's tolerance level (see the module docstring)."""

    nmse: float
    rel: float
    atol: float
    rel_imatrix: float | None = None
    block: int = 32  # elements sharing one amax (the super-block for K-quants)


LEVELS: dict[str, Level] = {
    "F32": Level(nmse=0.0, rel=0.0, atol=0.0, block=1),
    "F16": Level(nmse=1e-7, rel=2.0**-11, atol=FP16_STEP, block=1),  # |x| <= 65504
    "BF16": Level(nmse=5e-6, rel=2.0**-8, atol=2.0**-133, block=1),  # 2**-133: bf16's smallest step
    "Q8_0": Level(nmse=5e-5, rel=0.005, atol=2 * 127 * FP16_STEP, rel_imatrix=0.005),
    "Q8_1": Level(nmse=5e-5, rel=0.005, atol=2 * 127 * FP16_STEP),
    "Q8_K": Level(nmse=8e-5, rel=0.004, atol=1e-37, block=256),  # float32 d
    "Q5_1": Level(nmse=0.0025, rel=0.04, atol=2 * 32 * FP16_STEP, rel_imatrix=0.15),  # |x| <= 65504 (fp16 m)
    "Q5_0": Level(nmse=0.003, rel=0.07, atol=2 * 16 * FP16_STEP, rel_imatrix=0.15),
    "Q4_1": Level(nmse=0.009, rel=0.075, atol=2 * 16 * FP16_STEP, rel_imatrix=0.3),  # |x| <= 65504 (fp16 m)
    "Q4_0": Level(nmse=0.012, rel=0.14, atol=2 * 8 * FP16_STEP, rel_imatrix=0.35),
    "Q6_K": Level(nmse=0.0006, rel=0.03, atol=2 * 32 * 128 * FP16_STEP, rel_imatrix=0.08, block=256),
    "Q3_K": Level(nmse=0.035, rel=0.5, atol=2 * 4 * 32 * FP16_STEP, rel_imatrix=0.6, block=256),
    # Q2_K/Q4_K/Q5_K: code times 4- or 6-bit sub-scale is at most 3*15, 15*63 and 31*63. Measured worst:
    # rel 0.56 / 0.72 (imatrix), 0.10 / 0.14, 0.05 / 0.08; nmse 0.088, 0.0052, 0.0013. Finite output needs
    # |x| below about 65504*15 (Q2_K) or 65504*63 (fp16 dmin).
    "Q2_K": Level(nmse=0.12, rel=0.75, atol=2 * 3 * 15 * FP16_STEP, rel_imatrix=0.95, block=256),
    "Q4_K": Level(nmse=0.0075, rel=0.15, atol=2 * 15 * 63 * FP16_STEP, rel_imatrix=0.22, block=256),
    "Q5_K": Level(nmse=0.002, rel=0.075, atol=2 * 31 * 63 * FP16_STEP, rel_imatrix=0.12, block=256),
    # MXFP4: the largest value, 6 * 2**(E-2) with E = floor(log2(amax)), is 0.75 * 2**(E+1), so an amax just
    # below 2**(E+1) is clipped by up to 0.25 * amax, and the top step (4 to 6) is half that; blocks whose
    # amax is below 2**-125 get a wrapped exponent and dequantize to 0 (ggml's x86 behaviour). No imatrix path.
    "MXFP4": Level(nmse=0.02, rel=0.25 + 2.0**-20, atol=2.0**-125),
}


def nmse(x: torch.Tensor, y: torch.Tensor) -> float:
    """``mse(x, y) / mse(x, 0)`` in float64; 0 when x is all zero and y equals it."""
    x64, y64 = x.double(), y.double()
    den = (x64 * x64).sum().item()
    num = ((y64 - x64) ** 2).sum().item()
    return num / den if den else (0.0 if num == 0 else float("inf"))


def worst_excess(x: torch.Tensor, y: torch.Tensor, level: Level, imatrix: bool = False) -> tuple[float, int]:
    """How far the worst element of ``y`` is past its bound (<= 0 when all are within), and its flat index.

    Args:
        x, y: tensors of the same shape whose last dimension is a multiple of ``level.block``.
        imatrix: use ``rel_imatrix`` instead of ``rel``.
    """
    rel = level.rel_imatrix if imatrix and level.rel_imatrix is not None else level.rel
    xb = x.double().reshape(-1, level.block)
    err = (y.double().reshape(-1, level.block) - xb).abs()
    bound = rel * xb.abs().amax(1, keepdim=True) + level.atol
    excess = (err - bound).reshape(-1)
    i = int(excess.argmax())
    return float(excess[i]), i
