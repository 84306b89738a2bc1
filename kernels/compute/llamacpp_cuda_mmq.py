"""The ``llamacpp_cuda_mmq`` compute path: llama.cpp's CUDA backend with its integer kernels (MMQ and MMVQ).

Weights: as ``llamacpp_cpu`` (GGUF block bytes for the attention linears, experts, shared expert,
dense MLP and output head; norms and the router dense F32; the embedding looked up dense in F32).

Arithmetic: every block-weight matmul is :func:`moetrace.kernels.engine.cuda_q8_1.matmul`: q8_1
activations (32-value blocks), exact int8 dots, float32 scaling and sums, MMVQ for batches of at
most 8 tokens and MMQ (int8 tensor cores, Q4_K/Q5_K scales formed in half) above; for the experts
the batch is the MoE block's token count, as ``mul_mat_id`` decides. The rest is transformers'
float32 modules, with the simplifications ``llamacpp_cpu`` lists (norms, RoPE, softmax and
attention as float32 torch ops; expert outputs added slot by slot). On the CPU the matmuls run in
the compiled kernels (kernels/csrc/engine_cuda.c: integer dots per 32-value block, the kernels'
float32 scale products and accumulation order); on other devices as a float32 GEMM of the
q8_1-dequantized activations with the kernel's effective weights (same products, float32
additions in the GEMM's order), except the types only the compiled kernels emulate, which are
computed on the CPU (see moetrace.kernels.engine.cuda_q8_1).
"""

from __future__ import annotations

import functools

from moetrace.errors import MoetraceError
from moetrace.kernels.compute.base import BlockWeight
from moetrace.kernels.compute.llamacpp_cpu import LlamaCppCPU


def mmq_linear(x: torch.Tensor, b: BlockWeight, index: int = 0, batch: int | None = None) -> torch.Tensor:
    """``x @ W.T`` the CUDA kernels' way for matrix ``index`` of ``b``: x (..., in) -> (..., out) float32.

    ``batch`` (default: the tokens of x) picks MMVQ or MMQ.
    """
    from moetrace.kernels.engine import cuda_q8_1

    n = b.shape[-1]
    x2 = x.reshape(-1, n)  # (tokens, in)
    kernel = cuda_q8_1.kernel_for(x2.shape[0] if batch is None else batch)
    y = cuda_q8_1.matmul(x2, b.data[index], b.ggml_type, n, kernel)  # (tokens, rows)
    return y.reshape(*x.shape[:-1], y.shape[-1])


class LlamaCppCudaMMQ(LlamaCppCPU):
    """llama.cpp CUDA: q8_1 activations, int8 dots, fp32 accumulation (MMQ/MMVQ), fp32 elsewhere."""

    name = "llamacpp_cuda_mmq"
    summary = ("llama.cpp CUDA MMQ/MMVQ: activations to q8_1 (32-value blocks), int8 dots from the GGUF blocks, "
               "fp32 accumulation; fp32 elsewhere (Q4_0 to Q8_0, MXFP4, Q2_K to Q6_K weights)")
    engine = "llamacpp_cuda_mmq"

    def prepare(self, layer: torch.nn.Module) -> None:
        import torch

        for m in layer.modules():
            if isinstance(m, torch.nn.Linear):
                m.forward = functools.partial(_linear_forward, m)

    def load(self, layer: torch.nn.Module, state: dict) -> None:
        """As llamacpp_cpu (blocks onto their modules), types checked, the experts' forward this path's."""
        import torch

        from moetrace.kernels.engine.cuda_q8_1 import supported_types

        types = supported_types()
        for key, v in state.items():
            for b in (v if isinstance(v, tuple) else (v,)):
                if isinstance(b, BlockWeight) and b.ggml_type not in types:
                    raise MoetraceError(f"compute path {self.name!r} emulates {', '.join(types)} weights; {key} is "
                                        f"{b.ggml_type} (use a file type made of those, e.g. q4_k_m, q8_0, q6_k)")
        super().load(layer, state)
        for mod in layer.modules():
            if hasattr(mod, "_moetrace_blocks") and not isinstance(mod, torch.nn.Linear) \
                    and not getattr(mod, "_moetrace_mmq", False):
                mod.forward = functools.partial(_experts_forward, mod)
                mod._moetrace_mmq = True

    def head(self, norm: torch.nn.Module, weight, hidden: torch.Tensor) -> torch.Tensor:
        import torch

        h = norm(hidden)  # (1, T, H)
        if isinstance(weight, BlockWeight):
            return mmq_linear(h[0], weight)  # (T, vocab)
        return torch.nn.functional.linear(h, weight)[0]


def _linear_forward(m, x):
    import torch

    b = getattr(m, "_moetrace_blocks", {}).get("weight")
    if b is None:
        return torch.nn.functional.linear(x, m.weight, m.bias)
    y = mmq_linear(x.float(), b)
    return y + m.bias if m.bias is not None else y  # ggml adds the bias after the matmul, in F32


# Experts whose weights the torch form unpacks at once (about 100 MB of float32 at Qwen3-30B-A3B widths).
EXPERT_GROUP = 16


def _experts_forward(mod, hidden, top_k_index, top_k_weights):
    """Fused-layout experts from GGUF blocks (gate and up tensors, down): hidden (T, H) -> (T, H).

    Each token's q8_1 activations are the same whichever expert reads them (quantization is per
    token row), so they are formed once for the gate and up products and once for the down
    products of all experts; each expert's rows of them go through its weight blocks (the torch
    form unpacks the weights of a group of experts at once).
    """
    import torch

    from moetrace.kernels.compute.llamacpp_cpu import _gated
    from moetrace.kernels.engine import cuda_q8_1 as K
    from moetrace.kernels.engine.moe import slot_sum

    blocks = mod._moetrace_blocks
    gate_up, down = blocks.get("gate_up_proj"), blocks.get("down_proj")
    if not (isinstance(gate_up, tuple) and len(gate_up) == 2 and isinstance(down, BlockWeight)):
        raise MoetraceError(f"compute path 'llamacpp_cuda_mmq' takes experts as separate gate and up GGUF tensors "
                            f"and a down tensor; this model's experts hold {sorted(blocks)}")
    x = hidden.reshape(-1, hidden.shape[-1]).float()  # (T, H)
    kernel = K.kernel_for(x.shape[0])  # mul_mat_id picks the kernel by the whole batch
    n_exp = down.data.shape[0]
    hit = [e for e in torch.unique(top_k_index).tolist() if 0 <= e < n_exp]
    if not hit:
        return torch.zeros_like(hidden)
    tokens = {e: torch.where(top_k_index == e)[0] for e in hit}  # (t_e,) token of each of e's slots
    b_gate, b_up = gate_up
    a_g = K.prepare(x, b_gate.ggml_type, kernel)
    a_u = a_g if b_up.ggml_type == b_gate.ggml_type else K.prepare(x, b_up.ggml_type, kernel)
    n_in, n_mid = b_gate.shape[-1], down.shape[-1]
    groups = [hit[i:i + EXPERT_GROUP] for i in range(0, len(hit), EXPERT_GROUP)]
    h = {}  # expert -> its gated activation on its tokens (t_e, I)
    for group in groups:
        gs = K.products([a_g.rows(tokens[e]) for e in group], [b_gate.data[e] for e in group], n_in)  # (t_e, I)
        us = K.products([a_u.rows(tokens[e]) for e in group], [b_up.data[e] for e in group], n_in)
        h.update({e: _gated(mod, g, u, e) for e, g, u in zip(group, gs, us)})
    a_d = K.prepare(torch.cat([h[e] for e in hit]), down.ggml_type, kernel)  # rows in hit order
    ends = torch.tensor([h[e].shape[0] for e in hit]).cumsum(0).tolist()
    span = {e: torch.arange(end - h[e].shape[0], end) for e, end in zip(hit, ends)}
    bias = getattr(mod, "down_proj_bias", None)
    out = {}
    for group in groups:
        ys = K.products([a_d.rows(span[e]) for e in group], [down.data[e] for e in group], n_mid)  # (t_e, H)
        for e, y in zip(group, ys):  # ggml adds the bias after the matmul
            out[e] = y + bias[e].to(torch.float32) if bias is not None else y

    y = slot_sum(x, top_k_index, top_k_weights, n_exp, lambda e, xe: out[e])
    return y.reshape(hidden.shape).to(hidden.dtype)
