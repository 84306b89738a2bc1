"""The ``bf16`` compute path: transformers' own modules, run in torch.bfloat16."""

from __future__ import annotations

from moetrace.kernels.compute.base import ComputePath


class BF16(ComputePath):
    """Weights dequantized in float32 and rounded to the dequant dtype (default bf16), then the
    transformers module computes in bfloat16: its tensors, activations and matmuls."""

    name = "bf16"
    summary = "torch in bfloat16: activations, matmuls and the module's tensors (weights dequantized to bf16 unless named)"
    compute = "bf16"
    default_dequant = "bf16"
