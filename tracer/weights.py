"""Derive a variant's weights from the reference: assign GGML types, quantize, dequantize, cast.

The quantization is ggml's, bit for bit (moetrace.kernels); dequantized values are computed in
float32 and then cast to the variant's compute dtype, as an engine that dequantizes to BF16 does.
"""

from __future__ import annotations

import torch

from moetrace.errors import MoetraceError
from moetrace.tracer.naming import GLOBAL_TENSORS, gguf_layer_names
from moetrace.tracer.variants import Variant

FLOAT_TYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}


def never_quantized(gguf_name: str, ndim: int) -> bool:
    """llama.cpp keeps 1-D tensors, norms and the router in F32."""
    return ndim < 2 or "_norm.weight" in gguf_name or "ffn_gate_inp.weight" in gguf_name


def tensor_types(source, variant: Variant) -> dict[str, str]:
    """GGUF tensor name -> GGML type name for every weight of the model under ``variant``."""
    specs = gguf_specs(source)
    if variant.weights == "orig":
        return {}
    if variant.pure_type is not None:
        from moetrace.kernels.base import BLOCK_SIZES

        t = variant.pure_type
        out = {}
        for name, shape in specs.items():
            if never_quantized(name, len(shape)):
                out[name] = "F32"
            elif shape[-1] % BLOCK_SIZES[t][0]:
                raise MoetraceError(
                    f"tensor {name} has rows of {shape[-1]} elements, which {t} blocks of {BLOCK_SIZES[t][0]} cannot take"
                )
            else:
                out[name] = t
        return out
    from moetrace.kernels import recipes

    return recipes.assign_types(
        [recipes.TensorSpec(n, s) for n, s in specs.items()], variant.weights, model_shape(source)
    )


def model_shape(source):
    from moetrace.kernels import recipes

    c = source.config
    return recipes.ModelShape(
        n_layer=c.num_hidden_layers, n_expert=c.num_experts, n_head=c.num_attention_heads,
        n_head_kv=c.num_key_value_heads,
    )


def gguf_specs(source) -> dict[str, tuple[int, ...]]:
    """GGUF name -> shape as gguf.GGUFReader reports it (HF's [out, in]; (E, rows, row length) for experts)."""
    c = source.config
    h, f, e = c.hidden_size, c.moe_intermediate_size, c.num_experts
    qd, kvd = c.num_attention_heads * c.head_dim, c.num_key_value_heads * c.head_dim
    out: dict[str, tuple[int, ...]] = {"token_embd.weight": (c.vocab_size, h)}
    for i in range(c.num_hidden_layers):
        b = f"blk.{i}."
        out.update({
            b + "attn_norm.weight": (h,), b + "attn_q.weight": (qd, h), b + "attn_k.weight": (kvd, h),
            b + "attn_v.weight": (kvd, h), b + "attn_output.weight": (h, qd),
            b + "attn_q_norm.weight": (c.head_dim,), b + "attn_k_norm.weight": (c.head_dim,),
            b + "ffn_norm.weight": (h,), b + "ffn_gate_inp.weight": (e, h),
            b + "ffn_gate_exps.weight": (e, f, h), b + "ffn_up_exps.weight": (e, f, h),
            b + "ffn_down_exps.weight": (e, h, f),
        })
    out["output_norm.weight"] = (h,)
    if not getattr(c, "tie_word_embeddings", False):
        out["output.weight"] = (c.vocab_size, h)
    return out


def apply_type(w: torch.Tensor, type_name: str | None, imatrix: torch.Tensor | None = None) -> torch.Tensor:
    """What a tensor stored as ``type_name`` dequantizes to, in float32.

    Args:
        w: (..., n_per_row) reference weights; 3-D expert tensors are quantized one row at a
            time, which is the same as one expert at a time.
        type_name: GGML type, or None/F32 for the tensor as it is.
    """
    from moetrace.kernels import dequantize, quantize

    w32 = w.to(torch.float32)
    if type_name is None or type_name == "F32":
        return w32
    if type_name in FLOAT_TYPES:
        return w32.to(FLOAT_TYPES[type_name]).to(torch.float32)
    rows = w32.reshape(-1, w32.shape[-1])  # (rows, n_per_row)
    q = quantize(rows, type_name, imatrix=imatrix)
    return dequantize(q, type_name, rows.shape[1]).reshape(w32.shape)


def variant_layer_state(ref: dict[str, torch.Tensor], layer: int, variant: Variant, types: dict[str, str]):
    """A decoder layer's weights under ``variant``, in its compute dtype.

    Args:
        ref: the reference layer state, keyed by name inside the layer.
        types: GGUF name -> GGML type (empty for ``orig``).
    """
    names = gguf_layer_names(layer)
    out = {}
    for key, w in ref.items():
        g = names.get(key)
        if isinstance(g, tuple) and types.get(g[0], "F32") == types.get(g[1], "F32"):
            v = apply_type(w, types.get(g[0]))  # same type for both halves: row-wise, no split needed
        elif isinstance(g, tuple):  # fused gate/up: (E, 2F, H) = gate (E, F, H) ++ up (E, F, H)
            half = w.shape[1] // 2
            gate = apply_type(w[:, :half], types.get(g[0]))
            up = apply_type(w[:, half:], types.get(g[1]))
            v = torch.cat([gate, up], dim=1)
        else:
            v = apply_type(w, types.get(g) if g else None)
        out[key] = v.to(variant.dtype)
    return out


def variant_global(source, variant: Variant, types: dict[str, str]) -> dict[str, torch.Tensor]:
    """Embedding, final norm and output head under ``variant`` (HF names)."""
    out = {}
    for hf, g in GLOBAL_TENSORS.items():
        if not source.has(hf):
            continue
        out[hf] = apply_type(source.tensor(hf), types.get(g)).to(variant.dtype)
    return out
