"""Q8_K and Q8_1 (activation formats) against numpy references of ggml's rules; F32, F16, BF16 against gguf-py.

gguf-py implements neither Q8_K nor Q8_1, so each is checked against an independent numpy transcription
of ``quantize_row_q8_K_ref`` / ``quantize_row_q8_1_ref`` (numpy float32 arithmetic is IEEE, like C's),
and against a float64 statement of what the bytes must mean.
"""

from __future__ import annotations

import gguf
import numpy as np
import pytest
import torch

from moetrace.kernels import dequantize, get_format, quantize
from moetrace.kernels.formats_activation import q8_k_bsums

F32 = np.float32


def _blocks(seed: int, n_blocks: int, size: int) -> np.ndarray:
    """Blocks of mixed character: Gaussian, exact ties of +-max, all zero, constant, tiny, one outlier."""
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal((n_blocks, size)) * rng.choice([1e-3, 1.0, 100.0], (n_blocks, 1))).astype(F32)
    x[0] = 0.0
    x[1] = 0.37
    x[2, :] = np.round(x[2] * 4) / 4
    x[2, 5], x[2, 9] = -3.0, 3.0  # the first of the tied magnitudes decides the sign
    x[3] *= F32(1e-30)
    x[4, 7] = 500.0
    x[5, :] = -0.0
    return x


def q8_k_reference(x: np.ndarray) -> np.ndarray:
    """quantize_row_q8_K_ref in numpy float32: (B, 256) float32 -> (B, 292) uint8."""
    out = np.zeros((x.shape[0], 292), dtype=np.uint8)
    for b, xb in enumerate(x):
        i = int(np.argmax(np.abs(xb)))  # first largest magnitude
        if np.abs(xb[i]) == 0:
            continue  # d = 0, codes 0 (ggml leaves bsums unwritten; we write zeros)
        iscale = F32(-127.0) / xb[i]
        q = np.minimum(np.rint(iscale * xb), 127).astype(np.int8)
        out[b, :4] = np.array([F32(1.0) / iscale], dtype=F32).view(np.uint8)
        out[b, 4:260] = q.view(np.uint8)
        out[b, 260:] = q.reshape(16, 16).astype(np.int16).sum(1).astype(np.int16).view(np.uint8)
    return out


def q8_1_reference(x: np.ndarray) -> np.ndarray:
    """quantize_row_q8_1_ref in numpy float32: (B, 32) float32 -> (B, 36) uint8."""
    amax = np.abs(x).max(1)
    d = (amax / F32(127.0)).astype(F32)
    with np.errstate(divide="ignore"):
        idv = np.where(d != 0, F32(1.0) / d, F32(0.0)).astype(F32)
    v = (x * idv[:, None]).astype(F32)
    q = (np.sign(v) * np.floor(np.abs(v.astype(np.float64)) + 0.5)).astype(np.int8)  # roundf, exact in float64
    s = (q.astype(np.int32).sum(1).astype(F32) * d).astype(F32)
    return np.concatenate(
        [d.astype(np.float16).view(np.uint8).reshape(-1, 2), s.astype(np.float16).view(np.uint8).reshape(-1, 2),
         q.view(np.uint8)], 1)


def test_q8_k_matches_reference_and_meaning():
    x = _blocks(0, 48, 256)
    fmt = get_format("Q8_K")
    q = fmt.quantize_blocks(torch.from_numpy(x), None)
    assert np.array_equal(q.numpy(), q8_k_reference(x))
    # What the bytes mean, in float64: y = d * q with |y - x| <= |d|/2 (up to float32 rounding of d*q and iscale*x).
    y = fmt.dequantize_blocks(q).numpy().astype(np.float64)
    d = q[:, :4].contiguous().view(torch.float32).numpy().astype(np.float64)
    assert np.all(np.abs(y - x) <= 0.5 * np.abs(d) * (1 + 1e-5) + 1e-45)
    codes = q[:, 4:260].contiguous().view(torch.int8).numpy().astype(np.int64)
    assert np.array_equal(q8_k_bsums(q).numpy(), codes.reshape(-1, 16, 16).sum(2))
    assert np.array_equal(y, (d.astype(F32) * codes.astype(F32)).astype(np.float64))  # dequantize_row_q8_K


def test_q8_k_public_api_round_trip():
    x = torch.from_numpy(_blocks(1, 8, 256).reshape(4, 512))
    q = quantize(x, "Q8_K")
    assert q.shape == (4, 584) and q.dtype == torch.uint8
    y = dequantize(q, "Q8_K", 512)
    assert torch.equal(quantize(y, "Q8_K"), q)  # re-quantizing the dequantized values is a fixed point


def test_q8_1_matches_reference():
    x = _blocks(2, 64, 32)
    fmt = get_format("Q8_1")
    q = fmt.quantize_blocks(torch.from_numpy(x), None)
    assert q.shape == (64, 36)
    assert np.array_equal(q.numpy(), q8_1_reference(x))
    # Its d and codes are Q8_0's, byte for byte (the two share quantize_row_q8_*_ref's rule).
    q0 = get_format("Q8_0").quantize_blocks(torch.from_numpy(x), None)
    assert torch.equal(q[:, :2], q0[:, :2]) and torch.equal(q[:, 4:], q0[:, 2:])
    y = fmt.dequantize_blocks(q)
    assert torch.equal(y, get_format("Q8_0").dequantize_blocks(q0))


def test_q8_1_public_api():
    x = torch.from_numpy(np.random.default_rng(3).standard_normal((2, 64)).astype(F32))
    q = quantize(x, "Q8_1")
    assert q.shape == (2, 72)  # two 36-byte blocks per row, ggml's block_q8_1
    assert torch.equal(q.reshape(-1, 36), get_format("Q8_1").quantize_blocks(x.reshape(-1, 32), None))


SPECIAL = np.array(
    [0.0, -0.0, 1.0, -1.0, 65504.0, -65504.0, 65519.0, 6e-8, 3e-8, 1e-45, -1e-45, 1.17549435e-38,
     3.4028235e38, -3.4028235e38, 1.0009766, 1.0039062, 1.0078125, 2.0**-134, 2.0**-133 * 1.5],
    dtype=F32,
)


@pytest.mark.filterwarnings("ignore:overflow encountered in cast:RuntimeWarning")
@pytest.mark.parametrize("type_name", ["F32", "F16", "BF16"])
def test_float_formats_match_gguf_py(type_name):
    rng = np.random.default_rng(3)
    x = np.concatenate([SPECIAL, (rng.standard_normal(4096) * 10.0 ** rng.integers(-40, 38, 4096)).astype(F32)])
    x = x[: (x.size // 4) * 4].reshape(4, -1)
    q = quantize(torch.from_numpy(x), type_name).numpy()
    qt = gguf.GGMLQuantizationType[type_name]
    assert np.array_equal(q, np.ascontiguousarray(gguf.quants.quantize(x, qt)).view(np.uint8).reshape(4, -1))
    y = dequantize(torch.from_numpy(q), type_name, x.shape[1]).numpy()
    assert np.array_equal(y.view(np.uint32), gguf.quants.dequantize(q, qt).astype(np.float32).view(np.uint32))


def test_bf16_nan_payloads_and_infinities_match_ggml():
    """NaNs keep their top bits with the quiet bit forced, as ggml_compute_fp32_to_bf16 (and gguf-py) do."""
    bits = np.array([0x7F800001, 0xFF800001, 0x7FC00000, 0x7FFFFFFF, 0xFFFFFFFF, 0x7FA12345, 0x7F800000,
                     0xFF800000, 0x7F7FFFFF, 0x00000001, 0x80008000, 0x3F808000, 0x3F818000], dtype=np.uint32)
    x = bits.view(F32)
    q = get_format("BF16").quantize_blocks(torch.from_numpy(x.copy()).reshape(-1, 1), None).numpy().reshape(-1)
    assert np.array_equal(q, gguf.quants.quantize(x, gguf.GGMLQuantizationType.BF16).reshape(-1))
    assert q.view(np.uint16)[0] == 0x7FC0 and q.view(np.uint16)[5] == 0x7FE1  # quiet bit forced, payload kept
