"""The ``ktransformers_decode`` compute path: KTransformers' decode (generate) of Qwen3-MoE from a GGUF file.

Read at kvcache-ai/ktransformers 95009ea6, ``optimize_rules/Qwen3Moe-serve.yaml`` (the first rule a
module matches wins, ``optimize/optimize.py``):

- every ``nn.Linear`` under ``model.layers`` - the attention projections and also the router
  ``mlp.gate`` - is ``KTransformersLinear`` with ``generate_op: KLinearMarlin``, and ``lm_head`` is
  ``VLinearMarlin``: the GGUF weight, dequantized to bf16, re-quantized to 4-bit symmetric groups
  of 64 whatever the file's type (:mod:`moetrace.kernels.engine.marlin`), multiplied in bf16
  (the activations' dtype) with fp32 accumulation. A Q8_0 or Q6_K file's attention and router
  are thus 4-bit here.
- the experts are ``KExpertsCPU``: the GGUF block bytes on the CPU, through ggml/llamafile, fed the
  bf16 hidden states converted to fp32 and quantized to the type's vec_dot_type: the
  ``llamacpp_cpu`` arithmetic; the weighted expert outputs are summed in fp32 and returned in bf16.
- the embedding and norms are bf16 (the loader's default dtype).

Not emulated: flashinfer attention, the fused RMSNorm kernel (transformers' bf16 modules here),
llamafile's own float order for Q8_0 experts (ggml's generic vec_dot here), and Marlin's k-slice
reduction through bf16 (see the marlin module).
"""

from __future__ import annotations

from moetrace.kernels.compute.base import BlockWeight, ComputePath, WeightForm, torch_dtype
from moetrace.kernels.compute.llamacpp_cpu import LlamaCppCPU

# Roles whose linears KTransformers runs as (K|V)LinearMarlin in decode: every nn.Linear of a layer and the head.
MARLIN_ROLES = ("attention", "router", "shared_expert", "dense_mlp", "lm_head")


class KTransformersDecode(LlamaCppCPU):
    """KTransformers decode: Marlin 4-bit linears (re-quantized in ``load``) in bf16, llamafile CPU experts."""

    name = "ktransformers_decode"
    summary = ("KTransformers decode (Qwen3-MoE rules): every layer linear and the head re-quantized to 4-bit "
               "groups of 64 (Marlin) in bf16, experts on the CPU from the GGUF blocks (llamacpp_cpu arithmetic)")
    compute = "bf16"
    dequants = ("bf16",)
    default_dequant = "bf16"
    engine = "llamacpp_cpu"  # the CPU experts' matmul

    def weight_form(self, role: str) -> WeightForm:
        if role == "experts":
            return WeightForm(blocks=True)
        # Marlin roles come in float32 and are rounded to bf16 inside marlin.quantize
        return WeightForm(dtype=torch_dtype("fp32" if role in MARLIN_ROLES else "bf16"))

    def prepare(self, layer) -> None:
        """Nothing to swap for the linears: ``load`` puts the Marlin weights in and bf16 torch multiplies."""

    def load(self, layer, state: dict) -> None:
        """Marlin roles replaced by their 4-bit round trip; the experts' blocks go onto the experts module."""
        from moetrace.kernels.engine import marlin

        roles = getattr(state, "roles", {})
        out = type(state)()
        out.roles = roles
        for key, v in state.items():
            if roles.get(key) in MARLIN_ROLES and not isinstance(v, (BlockWeight, tuple)) and v.ndim == 2:
                v = marlin.roundtrip(v, self.dtype)  # (out, in) bf16
            out[key] = v
        super().load(layer, out)

    def global_weight(self, role: str, w):
        from moetrace.kernels.engine import marlin

        if role == "lm_head" and not isinstance(w, BlockWeight):
            return marlin.roundtrip(w, self.dtype)  # VLinearMarlin
        return ComputePath.global_weight(self, role, w)

    def head(self, norm, weight, hidden):
        return ComputePath.head(self, norm, weight, hidden)
