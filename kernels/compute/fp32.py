"""The ``fp32`` compute path: transformers' own modules, run in torch.float32."""

from __future__ import annotations

from moetrace.kernels.compute.base import ComputePath


class FP32(ComputePath):
    """Weights dequantized in float32 and rounded to the dequant dtype (default fp32), then the
    transformers module computes in float32: its tensors, activations and matmuls."""

    name = "fp32"
    summary = "torch in float32: activations, matmuls and the module's tensors (weights dequantized to fp32 unless named)"
    compute = "fp32"
    default_dequant = "fp32"
