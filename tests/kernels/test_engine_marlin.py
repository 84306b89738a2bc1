"""KTransformers' Marlin re-quantization and its decode linears against a float64 model of the documented algorithm.

The model (numpy, float64 with explicit bf16 roundings where the torch ops of KTransformers'
``quantize_weights`` and the Marlin kernel round) is written independently of
moetrace.kernels.engine.marlin; codes and dequantized weights must equal it bit for bit.
"""

from __future__ import annotations

import numpy as np
import torch

from moetrace.kernels import compute, dequantize, quantize
from moetrace.kernels.engine import marlin

U32 = 2.0 ** -24  # float32 unit roundoff
U_BF16 = 2.0 ** -8  # bf16 unit roundoff


def _bf16(v) -> np.ndarray:
    """float64 -> float32 -> bf16 (round to nearest even), returned as float64."""
    f = np.asarray(v, dtype=np.float32)
    bits = f.view(np.uint32).astype(np.uint64)
    bits = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16) << 16
    return bits.astype(np.uint32).view(np.float32).astype(np.float64)


def _marlin_model(w: np.ndarray):
    """Per row and group of 64 (zero-padded): s = bf16(max|w| * fl32(2/15)), q = clamp(rint(bf16(w/s)) + 8, 0, 15),
    weight (q - 8) * s rounded to bf16."""
    out, k = w.shape
    pad = (-k) % 64
    wb = np.pad(_bf16(w), ((0, 0), (0, pad))).reshape(out, -1, 64)
    s = _bf16(np.float32(np.abs(wb).max(-1, keepdims=True)) * np.float32(2 / 15))
    with np.errstate(divide="ignore", invalid="ignore"):
        r = np.where(s == 0, 0.0, np.rint(_bf16(np.float32(wb) / np.float32(s))))
    q = np.clip(r + 8, 0, 15)
    w_hat = _bf16((q - 8) * s).reshape(out, -1)[:, :k]
    return q.reshape(out, -1)[:, :k], s[..., 0], w_hat


def _weights(rows=48, k=200, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, k, generator=g) * torch.exp(torch.randn(rows, 1, generator=g))
    w[3, :64] = 0  # an all-zero group
    w[5, 7] = 40.0  # an outlier that sets its group's scale
    return w


def test_codes_and_weights_equal_the_float64_model():
    w = _weights()
    codes, scales = marlin.quantize(w)
    q, s, w_hat = _marlin_model(w.numpy())
    assert np.array_equal(codes.numpy(), q), f"{int((codes.numpy() != q).sum())} codes differ"
    assert np.array_equal(scales.float().numpy(), s)
    got = marlin.dequantize(codes, scales).float().numpy()
    assert np.array_equal(got, w_hat), f"{int((got != w_hat).sum())} weights differ"
    assert codes.min() >= 0 and codes.max() <= 15 and (codes.numpy()[3, :64] == 8).all()


def test_error_is_half_a_step_of_the_group():
    """|w_hat - w| <= s/2 (rounding to the grid; the clipped max at 7.5 s is also s/2 away) plus the bf16
    roundings: of w (U_BF16 |w|), of w/s (at most 7.5 U_BF16 in units of s), of the product (U_BF16 |w_hat|)."""
    w = _weights(seed=1)
    codes, scales = marlin.quantize(w)
    w_hat = marlin.dequantize(codes, scales).double()
    s = scales.double().repeat_interleave(64, 1)[:, :w.shape[1]]
    bound = s * (0.5 + 7.5 * U_BF16) + U_BF16 * (w.double().abs() + w_hat.abs())
    assert ((w_hat - w.double()).abs() <= bound).all()


def test_q8_0_weights_lose_their_precision_to_the_requantization():
    """What KTransformers' decode does to a Q8_0 file's attention: the 4-bit re-quantization's error
    dwarfs Q8_0's own (over ten times) and is that of re-quantizing the original weights (within 10%)."""
    w = torch.randn(64, 512, generator=torch.Generator().manual_seed(2))

    def rel(a):
        return float((a.double() - w.double()).norm() / w.double().norm())

    q8 = dequantize(quantize(w, "Q8_0"), "Q8_0", 512)
    assert rel(marlin.roundtrip(q8)) > 10 * rel(q8)
    assert abs(rel(marlin.roundtrip(q8)) / rel(marlin.roundtrip(w)) - 1) < 0.1


def _prepared(path_name: str, w: torch.Tensor, role: str):
    path = compute.get(path_name)
    lin = torch.nn.Linear(w.shape[1], w.shape[0], bias=False)
    layer = torch.nn.Sequential(lin)
    path.prepare(layer)
    layer._moetrace_tensors = None
    state = type("S", (dict,), {})()
    state["0.weight"] = w
    state.roles = {"0.weight": role}
    path.load(layer, state)
    return lin


def test_decode_linear_is_a_bf16_product_of_the_marlin_weights():
    """The decode path's attention linear: bf16 inputs times the Marlin weights, fp32 accumulation
    (n U32 sum |x w|), one bf16 rounding of the output (U_BF16 |y|)."""
    w = _weights(rows=32, k=256, seed=3)
    x = torch.randn(5, 256, generator=torch.Generator().manual_seed(4)).to(torch.bfloat16)
    lin = _prepared("ktransformers_decode", w, "attention")
    with torch.no_grad():
        y = lin(x).double().numpy()
    _, _, w_hat = _marlin_model(w.numpy())
    xd = x.double().numpy()
    exact = xd @ w_hat.T
    bound = U_BF16 * np.abs(exact) + 256 * U32 * (np.abs(xd) @ np.abs(w_hat).T)
    assert (np.abs(y - exact) <= bound).all()
    assert lin.weight.dtype == torch.bfloat16


def test_router_is_requantized_too():
    """The rules' linear pattern matches mlp.gate (first match wins), so the router is Marlin in decode."""
    w = _weights(rows=16, k=128, seed=5)
    lin = _prepared("ktransformers_decode", w, "router")
    assert torch.equal(lin.weight, marlin.roundtrip(w))
    assert not torch.equal(lin.weight, w.to(torch.bfloat16))
