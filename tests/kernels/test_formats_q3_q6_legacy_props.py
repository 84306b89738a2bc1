"""Property tests: the Q3_K/Q6_K, legacy, Q8_K/Q8_1 and float formats on arbitrary shapes and scales.

For finite input within fp16's range, quantize never fails and dequantize(quantize(x)) stays within the
type's named level in ``tolerances.py``; for any finite float32 input, both still run.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from moetrace.kernels import dequantize, get_format, quantize
from tolerances import LEVELS, nmse, worst_excess

TYPES = ["Q3_K", "Q6_K", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q8_1", "Q8_K", "F32", "F16", "BF16"]
IMATRIX_TYPES = ["Q3_K", "Q6_K", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0"]
FP16_MAX = 65504.0
SETTINGS = settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def round_trip(x: torch.Tensor, type_name: str, imatrix: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(bytes, values) of x through the format: through ``quantize()`` where it applies, else by blocks.

    Q8_1 (an activation type) and the legacy imatrix paths (which need ``n_per_row``) are called on the
    format directly, so these properties hold for the block methods themselves.
    """
    fmt = get_format(type_name)
    rows, n = x.shape
    if type_name != "Q8_1" and (imatrix is None or not getattr(fmt, "needs_row_length", False)):
        q = quantize(x, type_name, imatrix)
        return q, dequantize(q, type_name, n)
    qw = None if imatrix is None else imatrix.reshape(1, n).expand(rows, n).reshape(-1, fmt.block_size)
    kw = {"n_per_row": n} if imatrix is not None else {}
    q = fmt.quantize_blocks(x.reshape(-1, fmt.block_size), qw, **kw)
    return q, fmt.dequantize_blocks(q).reshape(rows, n)


@st.composite
def matrices(draw, block: int, limit: float = FP16_MAX) -> np.ndarray:
    """(rows, n) float32 with n a multiple of ``block``: Gaussian, zeros, constants, sparse, outliers, or
    arbitrary floats, at scales from 1e-12 to fp16's limit."""
    rows = draw(st.integers(1, 3))
    n = block * draw(st.integers(1, 2 if block >= 256 else 4))
    kind = draw(st.sampled_from(["gauss", "zeros", "constant", "sparse", "outlier", "arbitrary", "ties"]))
    if kind == "arbitrary":
        return draw(arrays(np.float32, (rows, n), elements=st.floats(-limit, limit, width=32)))
    scale = np.float32(10.0 ** draw(st.floats(-12.0, 4.0)))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    x = rng.standard_normal((rows, n)).astype(np.float32)
    if kind == "zeros":
        x[:] = 0.0
    elif kind == "constant":
        x[:] = rng.choice([-1.0, 1.0]) * abs(x[0, 0])
    elif kind == "sparse":
        x[rng.random((rows, n)) < 0.9] = 0.0
    elif kind == "outlier":
        x *= 0.01
        x[:, rng.integers(0, n)] = 3.0
    elif kind == "ties":
        x = np.round(x * 2) / 2  # many equal magnitudes of both signs
    return np.clip(x * scale, -limit, limit).astype(np.float32)


def _check(type_name: str, x: np.ndarray, imatrix: np.ndarray | None) -> None:
    xt = torch.from_numpy(x)
    q, y = round_trip(xt, type_name, None if imatrix is None else torch.from_numpy(imatrix))
    fmt = get_format(type_name)
    assert q.dtype == torch.uint8 and q.numel() == x.size // fmt.block_size * fmt.type_size
    assert y.shape == xt.shape and y.dtype == torch.float32
    assert torch.isfinite(y).all(), f"{type_name}: non-finite values from finite input within fp16 range"
    level = LEVELS[type_name]
    excess, i = worst_excess(xt, y, level, imatrix=imatrix is not None)
    assert excess <= 0, (
        f"{type_name}{' with imatrix' if imatrix is not None else ''}: element {i} is {excess:.3g} past "
        f"its bound (x={xt.reshape(-1)[i].item():.6g}, y={y.reshape(-1)[i].item():.6g})"
    )


@pytest.mark.parametrize("type_name", TYPES)
def test_round_trip_within_level(type_name):
    block = max(get_format(type_name).block_size, 32)

    @SETTINGS
    @given(x=matrices(block))
    def check(x):
        _check(type_name, x, None)

    check()


@pytest.mark.parametrize("type_name", IMATRIX_TYPES)
def test_round_trip_with_imatrix_within_level(type_name):
    block = get_format(type_name).block_size
    # Q4_1/Q5_1's least-squares minimum may lie beyond the data's (stored as fp16 m): keep headroom.
    limit = FP16_MAX / 4 if type_name in ("Q4_1", "Q5_1") else FP16_MAX

    @SETTINGS
    @given(x=matrices(block, limit), data=st.data())
    def check(x, data):
        im = data.draw(arrays(np.float32, (x.shape[1],), elements=st.floats(0.125, 10.0, width=32)))
        _check(type_name, x, im)

    check()


@pytest.mark.parametrize("type_name", TYPES)
def test_never_fails_on_extreme_finite_input(type_name):
    """Values up to float32's limit and down to its subnormals: no exception, right shapes."""
    fmt = get_format(type_name)
    block = max(fmt.block_size, 32)

    @settings(max_examples=15, deadline=None)
    @given(x=arrays(np.float32, (2, block), elements=st.floats(width=32, allow_nan=False, allow_infinity=False)))
    def check(x):
        q, y = round_trip(torch.from_numpy(x), type_name, None)
        assert y.shape == (2, block)

    check()


@pytest.mark.parametrize("type_name", TYPES)
def test_gaussian_nmse_level(type_name):
    x = torch.randn(16, 512, generator=torch.Generator().manual_seed(5))
    _, y = round_trip(x, type_name, None)
    assert nmse(x, y) <= LEVELS[type_name].nmse
