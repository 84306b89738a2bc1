"""Tensor names: transformers (HF) names of a Qwen3-MoE checkpoint and their GGUF (llama.cpp) names.

Within a decoder layer moetrace keys tensors by their HF name relative to the layer
(``self_attn.q_proj.weight``); the GGUF name (``blk.N.attn_q.weight``) is what llama.cpp's
file-type rules are written against. The fused expert tensor ``mlp.experts.gate_up_proj``
(E, 2I, H) is two GGUF tensors, ``ffn_gate_exps`` (its [:, :I]) and ``ffn_up_exps`` ([:, I:]).
"""

from __future__ import annotations

# HF name inside a decoder layer -> GGUF name stem (blk.N.<stem>.weight).
LAYER_TENSORS: dict[str, str] = {
    "input_layernorm.weight": "attn_norm",
    "self_attn.q_proj.weight": "attn_q",
    "self_attn.k_proj.weight": "attn_k",
    "self_attn.v_proj.weight": "attn_v",
    "self_attn.o_proj.weight": "attn_output",
    "self_attn.q_norm.weight": "attn_q_norm",
    "self_attn.k_norm.weight": "attn_k_norm",
    "post_attention_layernorm.weight": "ffn_norm",
    "mlp.gate.weight": "ffn_gate_inp",
    # The fused gate/up tensor maps to two GGUF tensors; see split_gate_up.
    "mlp.experts.gate_up_proj": ("ffn_gate_exps", "ffn_up_exps"),
    "mlp.experts.down_proj": "ffn_down_exps",
}

# HF names outside the decoder layers -> GGUF names.
GLOBAL_TENSORS: dict[str, str] = {
    "model.embed_tokens.weight": "token_embd.weight",
    "model.norm.weight": "output_norm.weight",
    "lm_head.weight": "output.weight",
}

# Expert projections as users name them (``--plant 3:5:down``), with the GGUF stem of each.
EXPERT_PROJS: dict[str, str] = {"gate": "ffn_gate_exps", "up": "ffn_up_exps", "down": "ffn_down_exps"}


def gguf_layer_names(layer: int) -> dict[str, str | tuple[str, str]]:
    """HF name inside layer ``layer`` -> full GGUF name(s)."""
    out: dict[str, str | tuple[str, str]] = {}
    for hf, stem in LAYER_TENSORS.items():
        if isinstance(stem, tuple):
            out[hf] = tuple(f"blk.{layer}.{s}.weight" for s in stem)
        else:
            out[hf] = f"blk.{layer}.{stem}.weight"
    return out


def layer_prefix(layer: int) -> str:
    """The HF key prefix of decoder layer ``layer``."""
    return f"model.layers.{layer}."
