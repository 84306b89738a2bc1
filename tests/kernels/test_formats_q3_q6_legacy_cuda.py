"""On a CUDA device the Q3_K/Q6_K, legacy, Q8_K/Q8_1 and float formats give the CPU's bytes and values."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from moetrace.kernels import get_format

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

GOLDEN = ["Q3_K", "Q6_K", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0"]
OTHERS = ["Q8_1", "Q8_K", "F32", "F16", "BF16"]


def _both(type_name: str, x: torch.Tensor, imatrix: torch.Tensor | None):
    fmt = get_format(type_name)
    rows, n = x.shape
    out = []
    for dev in ("cpu", "cuda"):
        xb = x.to(dev).reshape(-1, fmt.block_size)
        qw = None if imatrix is None else imatrix.to(dev).reshape(1, n).expand(rows, n).reshape(-1, fmt.block_size)
        kw = {"n_per_row": n} if qw is not None and getattr(fmt, "needs_row_length", False) else {}
        q = fmt.quantize_blocks(xb, qw, **kw)
        out.append((q.cpu(), fmt.dequantize_blocks(q).cpu()))
    return out


@pytest.mark.parametrize("path", ["ref", "imat"])
@pytest.mark.parametrize("type_name", GOLDEN)
def test_cuda_matches_ggml(ggml_vectors, type_name, path):
    with np.load(ggml_vectors / f"{type_name}.npz") as z:
        x, im, want = torch.from_numpy(z["x"]), torch.from_numpy(z["imatrix"]), z[f"q_{path}"]
    (_, _), (q, y) = _both(type_name, x, im if path == "imat" else None)
    assert np.array_equal(q.numpy().reshape(want.shape), want)


@pytest.mark.parametrize("type_name", OTHERS)
def test_cuda_matches_cpu(type_name):
    x = torch.randn(8, 512, generator=torch.Generator().manual_seed(0)) * 3
    x[0] = 0.0
    (qc, yc), (qg, yg) = _both(type_name, x, None)
    assert torch.equal(qc, qg)
    assert torch.equal(yc.view(torch.int32), yg.view(torch.int32))
