"""The ``fp16`` compute path: transformers' own modules, run in torch.float16."""

from __future__ import annotations

from moetrace.kernels.compute.base import ComputePath


class FP16(ComputePath):
    """Weights dequantized in float32 and rounded to the dequant dtype (default fp16), then the
    transformers module computes in float16: its tensors, activations and matmuls."""

    name = "fp16"
    summary = "torch in float16: activations, matmuls and the module's tensors (weights dequantized to fp16 unless named)"
    compute = "fp16"
    default_dequant = "fp16"
