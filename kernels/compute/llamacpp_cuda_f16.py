"""The ``llamacpp_cuda_f16`` compute path: llama.cpp's CUDA backend when it multiplies through cuBLAS.

Read at ggml-org/llama.cpp (ggml/src/ggml-cuda/ggml-cuda.cu, ``ggml_cuda_op_mul_mat_cublas``):
a quantized weight that the integer kernels (MMQ/MMVQ) do not take - a ``GGML_CUDA_FORCE_CUBLAS``
build, a GPU without int8 tensor cores - is dequantized to F16, the F32 activations are
converted to F16, and ``cublasGemmEx`` runs with ``CUBLAS_COMPUTE_16F`` and an F16 output, which
is converted back to F32. Everything else in the graph is F32.

Weights: the matrices of the attention, experts, shared expert, dense MLP and output head are
dequantized in float32 and rounded to F16 (``to_fp16_cuda`` computes the block formula in float
and stores half); norms and the router stay F32 and multiply in F32 (cuBLAS SGEMM); the token
embedding is looked up dense in F32 (``get_rows`` dequantizes to F32).

Arithmetic: each such linear is :func:`moetrace.kernels.engine.hgemm.hgemm` (F16 accumulator
rounded every 16 inputs, F16 output), the rest transformers' float32 modules. Simplifications, as
in ``llamacpp_cpu``: RMSNorm, RoPE, softmax, SiLU and attention (F16 K/V cache in llama.cpp) run
as transformers' float32 ops; ``orig`` weights (BF16/F32 checkpoints) are treated as an F16 file
would be; experts' outputs are weighted and added slot by slot in float32 (``build_moe_ffn``).
"""

from __future__ import annotations

import functools

from moetrace.kernels.compute.base import ComputePath, WeightForm, torch_dtype

# Roles whose matrices llama.cpp quantizes, and so multiplies through the F16 cuBLAS fallback.
F16_ROLES = ("attention", "experts", "shared_expert", "dense_mlp", "lm_head")


class LlamaCppCudaF16(ComputePath):
    """llama.cpp CUDA with cuBLAS: F16-dequantized weights, F16 GEMM with F16 accumulation, F32 elsewhere."""

    name = "llamacpp_cuda_f16"
    summary = ("llama.cpp CUDA cuBLAS fallback: weights dequantized to F16, F16 GEMM (CUBLAS_COMPUTE_16F) "
               "with F16 output, F32 elsewhere")
    compute = "fp32"
    dequants = ("fp16",)
    default_dequant = "fp16"

    def weight_form(self, role: str) -> WeightForm:
        return WeightForm(dtype=torch_dtype("fp16" if role in F16_ROLES else "fp32"))

    def prepare(self, layer: torch.nn.Module) -> None:
        """Linears holding an F16 role's weight multiply with :func:`hgemm`; the experts module likewise."""
        import torch

        for m in layer.modules():
            if isinstance(m, torch.nn.Linear):
                m.forward = functools.partial(_linear_forward, m)

    def load(self, layer: torch.nn.Module, state: dict) -> None:
        super().load(layer, state)
        roles = getattr(state, "roles", {})
        for key, role in roles.items():
            if role not in F16_ROLES or key not in state:
                continue
            owner = layer.get_submodule(key.rsplit(".", 1)[0]) if "." in key else layer
            if not getattr(owner, "_moetrace_f16", False):
                owner._moetrace_f16 = True
                if role in ("experts",):  # the fused experts module: its own forward
                    owner.forward = functools.partial(_experts_forward, owner)

    def head(self, norm: torch.nn.Module, weight: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
        from moetrace.kernels.engine.hgemm import hgemm

        h = norm(hidden)[0]  # (T, H)
        return hgemm(h, weight).float()  # (T, vocab)


def _linear_forward(m, x):
    import torch

    from moetrace.kernels.engine.hgemm import hgemm

    if not getattr(m, "_moetrace_f16", False):  # the router: F32 weights, F32 GEMM
        return torch.nn.functional.linear(x, m.weight, m.bias)
    y = hgemm(x.reshape(-1, x.shape[-1]), m.weight).float().reshape(*x.shape[:-1], m.weight.shape[0])
    return y + m.bias if m.bias is not None else y  # ggml adds a bias after the matmul, in F32


def _experts_forward(mod, hidden, top_k_index, top_k_weights):
    """Fused experts, gate_up (E, 2I, H) and down (E, H, I): hidden (T, H) -> (T, H), each matmul an F16 GEMM."""
    from moetrace.kernels.engine.hgemm import hgemm
    from moetrace.kernels.engine.moe import fused_experts, slot_sum

    gate_up, down = fused_experts(mod, LlamaCppCudaF16.name)
    inter = down.shape[-1]

    def expert(e, x):  # x (t_e, H)
        gu = hgemm(x, gate_up[e]).float()  # (t_e, 2I): the gate and up GEMMs, row by row the same
        return hgemm(mod.act_fn(gu[:, :inter]) * gu[:, inter:], down[e]).float()  # (t_e, H)

    x = hidden.reshape(-1, hidden.shape[-1]).float()
    out = slot_sum(x, top_k_index, top_k_weights, gate_up.shape[0], expert)
    return out.reshape(hidden.shape).to(hidden.dtype)
