"""Drawn weight rows for the kernels' property tests: one strategy, every kind of input that stresses a quantizer.

Kinds: Gaussian, Student-t, zeros, constants, tiny values (fp16 scales subnormal or flushed),
float32 subnormals (ranges whose inverse overflows), the largest fp16 magnitudes, sparse rows,
outliers, blocks of 16 at their own scales, values whose fp16 scales overflow to Inf, one block far
beyond the rest, and ranges that overflow float32 arithmetic.
"""

from __future__ import annotations

import numpy as np
from hypothesis import strategies as st

KINDS = ["gauss", "student_t", "zeros", "constant", "tiny", "subnormal", "fp16_edge", "sparse", "outlier",
         "mixed_blocks", "scale_overflow", "huge_block", "float32_edge"]


@st.composite
def weight_rows(draw, block: int = 256, max_rows: int = 3, zero_weights: bool = False):
    """(kind, x (rows, n) float32, imatrix (n,) float32 or None) from a drawn kind, shape and seed.

    Args:
        block: the format's block size; rows hold 1-3 super-blocks of 256, or 1-24 blocks of a smaller size.
        max_rows: the most rows drawn.
        zero_weights: let the importance matrix hold zeros (about one entry in ten).
    """
    kind = draw(st.sampled_from(KINDS))
    rows = draw(st.integers(1, max_rows))
    n = 256 * draw(st.integers(1, 3)) if block == 256 else block * draw(st.integers(1, 24))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    g = rng.standard_normal((rows, n))
    if kind == "student_t":
        x = rng.standard_t(3, (rows, n))
    elif kind == "zeros":
        x = np.zeros((rows, n))
    elif kind == "constant":
        x = np.full((rows, n), rng.choice([-1, 1]) * 10.0 ** rng.uniform(-8, 4))
    elif kind == "tiny":  # fp16 super-block scales in the subnormal range or flushed to 0
        x = g * 10.0 ** rng.uniform(-12, -4)
    elif kind == "subnormal":  # float32 subnormals: ranges whose inverse overflows
        x = g * 1e-41
    elif kind == "fp16_edge":  # the largest magnitudes fp16 holds
        x = g / np.abs(g).max() * 65504.0 * rng.uniform(0.5, 1.0)
    elif kind == "sparse":
        x = g * (rng.random((rows, n)) < 0.05)
    elif kind == "outlier":
        x = g.copy()
        x[:, rng.integers(0, n, 3)] *= 1000.0
    elif kind == "mixed_blocks":  # every 16 values at their own scale
        x = (g.reshape(rows, -1, 16) * 10.0 ** rng.uniform(-10, 4, (rows, n // 16, 1))).reshape(rows, n)
    elif kind == "scale_overflow":  # fp16 d or dmin overflow to Inf
        x = g * 10.0 ** rng.uniform(7, 30)
    elif kind == "huge_block":  # one block far beyond fp16's range, the rest ordinary
        x = g.copy()
        x[:, :block] *= 1e7
    elif kind == "float32_edge":  # ranges that overflow float32 arithmetic
        x = np.clip(g * 3e38, -3.4e38, 3.4e38)
    else:
        x = g
    imatrix = None
    if draw(st.booleans()):
        imatrix = rng.uniform(0.1, 10.0, n)
        if zero_weights:
            imatrix *= rng.random(n) > 0.1
        imatrix = imatrix.astype(np.float32)
    return kind, x.astype(np.float32), imatrix
