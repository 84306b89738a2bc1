"""Writing small GGUF files for tests, independently of moetrace's own writer.

Tensors are quantized with moetrace.kernels.quantize (bit-exact with ggml) and written with
gguf-py's GGUFWriter under llama.cpp's qwen3moe names, with the metadata llama.cpp writes.
"""

from __future__ import annotations

import numpy as np
import torch

# llama.cpp's qwen3moe tensor names (convert_hf_to_gguf.py), written out here so these files do not
# depend on moetrace's own name table (the family's, derived from gguf-py).
_LAYER = {
    "input_layernorm.weight": "attn_norm", "self_attn.q_proj.weight": "attn_q", "self_attn.k_proj.weight": "attn_k",
    "self_attn.v_proj.weight": "attn_v", "self_attn.o_proj.weight": "attn_output",
    "self_attn.q_norm.weight": "attn_q_norm", "self_attn.k_norm.weight": "attn_k_norm",
    "post_attention_layernorm.weight": "ffn_norm", "mlp.gate.weight": "ffn_gate_inp",
    "mlp.experts.gate_up_proj": ("ffn_gate_exps", "ffn_up_exps"), "mlp.experts.down_proj": "ffn_down_exps",
}


def gguf_layer_names(layer: int) -> dict:
    """HF name inside layer ``layer`` -> GGUF name(s)."""
    full = lambda s: f"blk.{layer}.{s}.weight"  # noqa: E731
    return {hf: tuple(map(full, s)) if isinstance(s, tuple) else full(s) for hf, s in _LAYER.items()}


def model_tensors(source):
    """Yield (gguf name, float32 tensor) for every tensor of a Qwen3-MoE source, in file order."""
    yield "token_embd.weight", source.tensor("model.embed_tokens.weight").float()
    for L in range(source.num_layers):
        state = source.layer_state(L)
        for hf, g in gguf_layer_names(L).items():
            w = state[hf].float()
            if isinstance(g, tuple):  # gate_up (E, 2I, H) -> gate, up (E, I, H)
                half = w.shape[1] // 2
                yield g[0], w[:, :half].contiguous()
                yield g[1], w[:, half:].contiguous()
            else:
                yield g, w
    yield "output_norm.weight", source.tensor("model.norm.weight").float()
    if source.has("lm_head.weight"):
        yield "output.weight", source.tensor("lm_head.weight").float()


def write_gguf(source, path, types=None, arch: str = "qwen3moe", default: str = "F32", edit=None) -> None:
    """Write ``source`` as a GGUF file.

    Args:
        types: GGUF name -> GGML type name (others take ``default``; 1-D tensors stay F32).
        edit: optional callable (name, tensor) -> tensor or None (None drops the tensor).
    """
    import gguf

    from moetrace.kernels import quantize

    c = source.config
    w = gguf.GGUFWriter(str(path), arch)
    w.add_name("moetrace-test")
    w.add_block_count(c.num_hidden_layers)
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_expert_feed_forward_length(c.moe_intermediate_size)
    w.add_head_count(c.num_attention_heads)
    w.add_head_count_kv(c.num_key_value_heads)
    w.add_key_length(c.head_dim)
    w.add_value_length(c.head_dim)
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    w.add_rope_freq_base(c.rope_parameters["rope_theta"])
    w.add_expert_count(c.num_experts)
    w.add_expert_used_count(c.num_experts_per_tok)
    w.add_vocab_size(c.vocab_size)
    types = types or {}
    for name, t in model_tensors(source):
        if edit is not None:
            t = edit(name, t)
            if t is None:
                continue
        kind = "F32" if t.ndim == 1 else types.get(name, default)
        if kind == "F32":
            w.add_tensor(name, t.numpy().astype(np.float32))
        elif kind == "F16":
            w.add_tensor(name, t.numpy().astype(np.float16))
        elif kind == "BF16":
            raw = t.to(torch.bfloat16).view(torch.int16).numpy().view(np.uint8)  # (..., 2n) bytes
            w.add_tensor(name, raw.reshape(*t.shape[:-1], -1), raw_dtype=gguf.GGMLQuantizationType.BF16)
        else:
            q = quantize(t.reshape(-1, t.shape[-1]), kind).numpy()  # (rows, bytes per row)
            w.add_tensor(name, q.reshape(*t.shape[:-1], q.shape[-1]), raw_dtype=gguf.GGMLQuantizationType[kind])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


# A mixed file like a small Q4_K_M: K-quants and Q8_0 on the matrices, one F16 and one BF16
# tensor, norms and the router in F32 (as llama.cpp keeps them).
def mixed_types(source) -> dict[str, str]:
    out = {"token_embd.weight": "Q4_K", "output.weight": "Q6_K"}
    for L in range(source.num_layers):
        b = f"blk.{L}."
        out.update({b + "attn_q.weight": "Q4_K", b + "attn_k.weight": "Q8_0", b + "attn_v.weight": "Q6_K",
                    b + "attn_output.weight": "F16" if L == 0 else "Q5_K",
                    b + "ffn_gate_exps.weight": "Q4_K", b + "ffn_up_exps.weight": "BF16" if L == 1 else "Q4_K",
                    b + "ffn_down_exps.weight": "Q6_K" if L % 2 == 0 else "Q4_K"})
    return out
