"""The ``ktransformers_prefill`` compute path: KTransformers' prefill of Qwen3-MoE from a GGUF file.

Read at kvcache-ai/ktransformers 95009ea6: ``optimize_rules/Qwen3Moe-serve.yaml`` gives every
``nn.Linear`` under ``model.layers`` (attention projections and the router ``mlp.gate`` alike) and
the ``lm_head`` the ``prefill_op: KLinearTorch``, and the experts ``prefill_op: KExpertsTorch``.
``KLinearTorch`` holds the GGUF weight dequantized to torch's default dtype (bf16:
custom_modeling_qwen3_moe.py sets it) and computes ``x.to(bf16) @ W.T``; ``KExpertsTorch`` holds
each expert's gate, up and down dequantized to bf16 and, expert by expert, computes the gate and
up products separately, ``act(G) * U``, the down product times the routing weight cast to bf16,
and ``index_add_``s it into a bf16 sum. The embedding is dequantized to bf16 too.

So prefill is "dequantize to bf16, then bf16 matmuls" (fp32 accumulation, bf16 outputs): the
``bf16`` path, with the experts' gate and up as two products, as KTransformers computes them.
Not emulated: its flashinfer attention and fused RMSNorm kernels (transformers' bf16 modules here).
"""

from __future__ import annotations

import functools

from moetrace.kernels.compute.bf16 import BF16


class KTransformersPrefill(BF16):
    """KTransformers prefill: KLinearTorch linears and KExpertsTorch experts, all bf16."""

    name = "ktransformers_prefill"
    summary = ("KTransformers prefill (Qwen3-MoE rules): GGUF dequantized to bf16, KLinearTorch linears and "
               "KExpertsTorch experts in bf16")
    dequants = ("bf16",)

    def prepare(self, layer: torch.nn.Module) -> None:
        """The fused experts module computes as KExpertsTorch (other modules are transformers' own)."""
        for m in layer.modules():
            if hasattr(m, "gate_up_proj") and hasattr(m, "down_proj") and hasattr(m, "act_fn"):
                m.forward = functools.partial(_experts_torch, m)


def _experts_torch(mod, hidden, top_k_index, top_k_weights):
    """KExpertsTorch.forward: hidden (T, H), top_k_index / top_k_weights (T, k) -> (T, H) in bf16."""
    import torch

    from moetrace.kernels.engine.moe import fused_experts

    gate_up, down = fused_experts(mod, KTransformersPrefill.name)
    inter = down.shape[-1]
    x = hidden.to(gate_up.dtype)  # (T, H)
    weights = top_k_weights.to(gate_up.dtype)  # routing_weights_cpu.to(self.gate.dtype)
    out = torch.zeros(x.shape, dtype=gate_up.dtype, device=x.device)
    for e in range(gate_up.shape[0]):  # every expert in order, as its loop over expert_num
        tok, pos = torch.where(top_k_index == e)
        if tok.numel() == 0:
            continue
        xe = x[tok]  # (t_e, H)
        g = xe @ gate_up[e, :inter].T  # (t_e, I): the gate and up products are separate matmuls
        u = xe @ gate_up[e, inter:].T
        y = (mod.act_fn(g) * u) @ down[e].T * weights[tok, pos, None]  # (t_e, H)
        out.index_add_(0, tok, y)
    return out.to(hidden.dtype)
