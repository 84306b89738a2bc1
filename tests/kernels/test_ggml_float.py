"""ggml_float: each helper is the float32 operation ggml's C performs, checked against numpy's float32."""

from __future__ import annotations

import numpy as np
import torch

from moetrace.kernels.ggml_float import fdiv, fdiv_by, fp16_round, nearest_int, seq_sum, sqrtf


def _nearest_int_c(f: np.ndarray) -> np.ndarray:
    """ggml's nearest_int in numpy, as its C does it."""
    v = (f.astype(np.float32) + np.float32(12582912.0)).view(np.int32)
    return (v & 0x007FFFFF) - 0x00400000


def test_nearest_int_is_ggml_bit_trick():
    edge = np.array([0.5, 1.5, 2.5, -0.5, -1.5, 4194303.0, 4194304.0, 5e6, -5e6, 1e30, -1e30,
                     np.inf, -np.inf, np.nan, -0.0, 3.4e38], dtype=np.float32)
    rnd = (np.random.default_rng(0).standard_normal(10000) * 100).astype(np.float32)
    f = np.concatenate([edge, rnd, np.round(rnd) + np.float32(0.5)])
    assert np.array_equal(nearest_int(torch.from_numpy(f)).numpy(), _nearest_int_c(f))


def test_sqrt_and_reverse_division_are_single_float32_roundings():
    x = np.random.default_rng(1).random(100000).astype(np.float32) * np.float32(50.0)
    assert np.array_equal(sqrtf(torch.from_numpy(x)).numpy(), np.sqrt(x))
    assert np.array_equal(fdiv(63.0, torch.from_numpy(x)).numpy(), np.float32(63.0) / x)


def test_division_by_a_constant_is_one_float32_rounding():
    x = np.random.default_rng(2).random(100000).astype(np.float32) * np.float32(50.0)
    assert np.array_equal(fdiv_by(torch.from_numpy(x), 63.0).numpy(), x / np.float32(63.0))


def test_seq_sum_is_the_c_loop_from_positive_zero():
    x = np.random.default_rng(3).standard_normal((32, 500)).astype(np.float32) * np.float32(1e4)
    acc = np.zeros(500, dtype=np.float32)
    for row in x:  # float s = 0; for (i) s += x[i];
        acc = acc + row
    got = seq_sum(torch.from_numpy(x), dim=0).numpy()
    assert np.array_equal(got.view(np.uint32), acc.view(np.uint32))
    # all terms -0.0: C's sum from 0.0f is +0.0, not -0.0
    neg = seq_sum(torch.full((4, 3), -0.0), dim=0)
    assert not torch.signbit(neg).any()


def test_fp16_round_matches_numpy_half():
    x = (np.random.default_rng(4).standard_normal(100000) * 3e4).astype(np.float32)
    with np.errstate(over="ignore"):  # |x| > 65504 rounds to Inf, on purpose
        want = x.astype(np.float16).astype(np.float32)
    assert np.array_equal(fp16_round(torch.from_numpy(x)).numpy().view(np.uint32), want.view(np.uint32))
