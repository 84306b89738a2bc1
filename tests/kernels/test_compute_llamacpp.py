"""The llamacpp_cpu compute path: its linears are kernels.matmul, its quantized variant differs from
the dense fp32 one only by activation quantization, and it runs end to end through the CLI."""

from __future__ import annotations

import numpy as np
import torch

import moetrace
from cli_runner import moetrace as run_cli
from moetrace.kernels import compute, dequantize, matmul, quantize
from moetrace.kernels.compute import BlockWeight

U = 2.0 ** -24


def _prepared_linear(w: torch.Tensor, t: str):
    path = compute.get("llamacpp_cpu")
    lin = torch.nn.Linear(w.shape[1], w.shape[0], bias=False)
    layer = torch.nn.Sequential(lin)
    path.prepare(layer)
    layer._moetrace_tensors = None
    state = type("S", (dict,), {})()
    state["0.weight"] = BlockWeight(quantize(w, t).numpy()[None], t, tuple(w.shape))
    state.roles = {"0.weight": "attention"}
    path.load(layer, state)
    return lin


def test_path_linear_is_kernels_matmul():
    g = torch.Generator().manual_seed(0)
    w, x = torch.randn(48, 512, generator=g), torch.randn(2, 5, 512, generator=g)
    for t in ("Q4_K", "Q8_0", "Q5_1"):
        lin = _prepared_linear(w, t)
        want = matmul(x.reshape(-1, 512), quantize(w, t), t, 512).reshape(2, 5, 48)
        assert torch.equal(lin(x), want), t


def test_q8_0_differs_from_dense_fp32_only_by_activation_quantization():
    """Q8_0 activations: x^ = fp16(d) * roundf(x / d), d = amax/127, so |x - x^| <= d/2 + 127 |fp16(d) - d|
    <= d (1/2 + 127 * 2**-11) per element of a 32-block. With the same dequantized weights W,
    |y - W x| <= sum_j |w_j| |x_j - x^_j| + (float32 sums on both sides) 2 * (n/32 + n) * 2**-24 * sum_j |w_j x_j|."""
    g = torch.Generator().manual_seed(1)
    n = 512
    w, x = torch.randn(64, n, generator=g), torch.randn(6, n, generator=g) * torch.exp(torch.randn(1, n, generator=g))
    q = quantize(w, "Q8_0")
    wd = dequantize(q, "Q8_0", n).double()
    y = _prepared_linear(w, "Q8_0")(x).double()
    dense = x.double() @ wd.T
    d = x.abs().reshape(6, -1, 32).amax(-1).double() / 127  # (tokens, blocks)
    dx = (d * (0.5 + 127 * 2.0 ** -11)).repeat_interleave(32, 1)  # (tokens, n) bound on |x - x^|
    bound = dx @ wd.abs().T + 2 * (n // 32 + n) * U * (x.double().abs() @ wd.abs().T)
    err = (y - dense).abs()
    assert (err <= bound).all(), f"worst {float((err / bound).max()):.2f} x bound"
    assert (err > 0).any()  # the activation quantization is there


def test_q8_0_llamacpp_cpu_runs_through_the_cli(tmp_path):
    run_cli("run", "--model", "builtin:tiny", "--variant", "q8_0-llamacpp_cpu", "--variant", "q8_0-fp32",
            "--out", str(tmp_path), "--run", "eng", "--text", "The engine path, end to end.")
    a = moetrace.open_trace(tmp_path / "eng" / "q8_0-llamacpp_cpu.zarr").logits.sel(mode="free").values
    b = moetrace.open_trace(tmp_path / "eng" / "q8_0-fp32.zarr").logits.sel(mode="free").values
    assert a.shape == b.shape and np.isfinite(a).all()
    assert not np.array_equal(a, b)
    rel = np.linalg.norm(a - b) / np.linalg.norm(b)
    assert rel < 0.1, f"logits relL2 {rel:.3f} between Q8_0 with and without activation quantization"
