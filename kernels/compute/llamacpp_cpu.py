"""The ``llamacpp_cpu`` compute path: llama.cpp's CPU backend computing from the GGUF block bytes.

Weights: block bytes (:class:`BlockWeight`) for the attention linears, experts, shared expert,
dense MLP and output head; norms and the router stay dense F32 as llama.cpp keeps them; the token
embedding comes dense in float32, which is what ggml's get_rows returns (it dequantizes the
looked-up rows to F32 with the same dequantizer).

Arithmetic: every linear and expert matmul goes through :func:`moetrace.kernels.matmul`
(activations quantized to the weight type's vec_dot_type, ggml's generic integer dots and float
order); the rest is transformers' module in float32. Where this differs from llama.cpp's CPU graph:

- RMSNorm, RoPE, softmax, SiLU and the router (F32 weights, F32 x F32 dot) run as transformers'
  float32 torch ops, not ggml's kernels (ggml's silu is x/(1+expf(-x)), its softmax and rms_norm
  sum in ggml_float/double): differences of a few float32 ulps per op.
- Attention: llama.cpp's CPU backend keeps the KV cache in F16 by default and (flash attention or
  not) forms KQ from F16 K; here Q, K and V stay float32 (the module's own attention).
- Expert outputs are weighted and summed over the top-k slots in slot order, as llama.cpp's
  build_moe_ffn does (``experts[0] + experts[1] + ...``), not transformers' per-expert index_add.
- An output head the variant keeps dense (F32/F16/BF16 types, or tied to a dense embedding) runs
  as a float32 torch linear.
"""

from __future__ import annotations

import functools

from moetrace.errors import MoetraceError
from moetrace.kernels.compute.base import BlockWeight, ComputePath, WeightForm, torch_dtype

# Roles llama.cpp quantizes (and so multiplies with integer dots); the others stay dense float32.
BLOCK_ROLES = ("attention", "experts", "shared_expert", "dense_mlp", "lm_head")


def block_linear(x: torch.Tensor, b: BlockWeight, index: int = 0, path: str = "llamacpp_cpu") -> torch.Tensor:
    """``x @ W.T`` the engine's way for matrix ``index`` of ``b``: x (..., in) -> (..., out) float32."""
    import torch
    from moetrace.kernels.engine.api import matmul

    q = torch.from_numpy(b.data[index])  # (rows, bytes per row)
    n = b.shape[-1]
    y = matmul(x.reshape(-1, n), q, b.ggml_type, n, path=path).to(x.device)  # (tokens, rows), computed on the CPU
    return y.reshape(*x.shape[:-1], q.shape[0])


class LlamaCppCPU(ComputePath):
    """llama.cpp's CPU backend: integer block dots from the GGUF bytes, fp32 elsewhere."""

    name = "llamacpp_cpu"
    summary = ("llama.cpp CPU backend: activations to the vec_dot_type (Q8_K/Q8_0/Q8_1), ggml's integer dots "
               "from the GGUF blocks, fp32 elsewhere")
    compute = "fp32"
    dequants = ()
    engine = "llamacpp_cpu"  # the matmul path of moetrace.kernels.matmul

    def weight_form(self, role: str) -> WeightForm:
        return WeightForm(blocks=True) if role in BLOCK_ROLES else WeightForm(dtype=torch_dtype("fp32"))

    def prepare(self, layer: torch.nn.Module) -> None:
        """Every nn.Linear computes from the block bytes ``load`` puts on it (dense where it has none)."""
        import torch

        for m in layer.modules():
            if isinstance(m, torch.nn.Linear):
                m.forward = functools.partial(_linear_forward, m, self.engine)

    def load(self, layer: torch.nn.Module, state: dict) -> None:
        """Block weights go onto their modules (their dense parameters removed); the rest as the base path."""
        import torch

        roles = getattr(state, "roles", {})
        dense = type(state)()
        dense.roles = roles
        dense.fp32 = getattr(state, "fp32", frozenset())
        for key, v in state.items():
            if not isinstance(v, (BlockWeight, tuple)):
                dense[key] = v
                continue
            owner, pname = key.rsplit(".", 1) if "." in key else ("", key)
            mod = layer.get_submodule(owner)
            if not hasattr(mod, "_moetrace_blocks"):
                mod._moetrace_blocks = {}
                if not isinstance(mod, torch.nn.Linear):  # the experts module: its own forward
                    mod.forward = functools.partial(_experts_forward, mod, self.engine)
            mod._moetrace_blocks[pname] = v
            if mod._parameters.get(pname) is not None:
                mod._parameters[pname] = None  # no dense copy: the module computes from the blocks
        super().load(layer, dense)

    def global_weight(self, role: str, w):
        return w if isinstance(w, BlockWeight) else super().global_weight(role, w)

    def head(self, norm: torch.nn.Module, weight, hidden: torch.Tensor) -> torch.Tensor:
        import torch

        h = norm(hidden)  # (1, T, H)
        if isinstance(weight, BlockWeight):
            return block_linear(h[0], weight, path=self.engine)  # (T, vocab)
        return torch.nn.functional.linear(h, weight)[0]


def _linear_forward(m: torch.nn.Linear, engine: str, x: torch.Tensor) -> torch.Tensor:
    import torch

    b = getattr(m, "_moetrace_blocks", {}).get("weight")
    if b is None:
        return torch.nn.functional.linear(x, m.weight, m.bias)
    y = block_linear(x, b, path=engine)
    return y + m.bias if m.bias is not None else y  # ggml adds the bias after the matmul, in F32


def _experts_forward(mod, engine: str, hidden: torch.Tensor, top_k_index: torch.Tensor,
                     top_k_weights: torch.Tensor) -> torch.Tensor:
    """Fused-layout experts (gate_up (E, 2I, H) as the gate and up GGUF tensors, down (E, H, I)):
    hidden (T, H), top_k_index / top_k_weights (T, k) -> (T, H)."""
    import torch

    blocks = mod._moetrace_blocks
    gate_up, down = blocks.get("gate_up_proj"), blocks.get("down_proj")
    if not (isinstance(gate_up, tuple) and len(gate_up) == 2 and isinstance(down, BlockWeight)):
        raise MoetraceError(f"compute path {engine!r} takes experts as separate gate and up GGUF tensors and a down "
                            f"tensor; this model's experts hold {sorted(blocks)}")
    x = hidden.reshape(-1, hidden.shape[-1]).to(torch.float32)  # (T, H)
    k = top_k_index.shape[-1]
    slots = torch.zeros(x.shape[0], k, down.shape[-2], dtype=torch.float32, device=x.device)  # (T, k, H)
    for e in torch.unique(top_k_index).tolist():
        if e < 0 or e >= down.data.shape[0]:
            continue  # padding index of some routers: no expert
        tok, pos = torch.where(top_k_index == e)
        xe = x[tok]  # (t_e, H)
        g = block_linear(xe, gate_up[0], e, engine)  # (t_e, I)
        u = block_linear(xe, gate_up[1], e, engine)
        y = block_linear(_gated(mod, g, u, e), down, e, engine)  # (t_e, H)
        if getattr(mod, "down_proj_bias", None) is not None:  # ggml adds it after the matmul, in F32
            y = y + mod.down_proj_bias[e].to(torch.float32)
        slots[tok, pos] = y * top_k_weights[tok, pos, None].to(torch.float32)
    out = slots[:, 0]
    for s in range(1, k):  # llama.cpp adds the weighted experts slot by slot
        out = out + slots[:, s]
    return out.reshape(hidden.shape).to(hidden.dtype)


def _gated(mod, g: torch.Tensor, u: torch.Tensor, e: int) -> torch.Tensor:
    """Expert ``e``'s activation of its gate and up outputs (t_e, I) -> (t_e, I): the module's own.

    transformers' experts modules gate through ``_apply_gate`` on gate and up joined as the module
    holds them: concatenated (``act_fn(gate) * up``), or interleaved where ``is_concatenated`` is
    False (GPT-OSS, whose ``_apply_gate`` is the clamped SwiGLU); per-expert gate/up biases
    (``gate_up_proj_bias``, same layout) are added after the matmuls, as ggml does.
    """
    import torch

    if not hasattr(mod, "_apply_gate"):
        return mod.act_fn(g) * u
    if getattr(mod, "is_concatenated", True):
        gate_up = torch.cat([g, u], dim=-1)  # (t_e, 2I)
    else:
        gate_up = torch.stack([g, u], dim=-1).flatten(-2)  # (t_e, 2I): gate at even, up at odd columns
    bias = getattr(mod, "gate_up_proj_bias", None)
    if bias is not None:
        gate_up = gate_up + bias[e].to(torch.float32)
    return mod._apply_gate(gate_up)
