"""Qwen3 (transformers ``qwen3``, GGUF ``qwen3``): a dense model, every decoder layer an MLP.

Traced beside Qwen3-MoE so one quantization can be put on an MoE model and a dense one side by
side. ``Qwen3DecoderLayer``: ``self_attn`` with per-head q/k RMS norms, ``mlp`` a SwiGLU
``Qwen3MLP`` of width ``intermediate_size`` (site ``mlp_out``); no router, so no routing sites.
"""

from moetrace.hooks.arch.family import ConfigKeys, Family, Sites

FAMILY = Family(
    name="qwen3",
    model_types=("qwen3",),
    gguf_arch="qwen3",
    hf_architecture="Qwen3ForCausalLM",
    tensors={
        "input_layernorm.weight": ("hidden",),
        "self_attn.q_proj.weight": ("q_dim", "hidden"),
        "self_attn.k_proj.weight": ("kv_dim", "hidden"),
        "self_attn.v_proj.weight": ("kv_dim", "hidden"),
        "self_attn.o_proj.weight": ("hidden", "q_dim"),
        "self_attn.q_norm.weight": ("head_dim",),
        "self_attn.k_norm.weight": ("head_dim",),
        "post_attention_layernorm.weight": ("hidden",),
    },
    dense_tensors={
        "mlp.gate_proj.weight": ("ffn_width", "hidden"),
        "mlp.up_proj.weight": ("ffn_width", "hidden"),
        "mlp.down_proj.weight": ("hidden", "ffn_width"),
    },
    keys=ConfigKeys(experts=None, top_k=None, expert_width=None, dense_layers=None, sparse_step=None, norm_topk=None),
    sites=Sites(attention="self_attn", moe="mlp", router="mlp.gate"),
    fusion=None,
    gguf_config={"hidden_act": "silu", "attention_bias": False},
    checked=(
        "reference logits and every layer's resid equal transformers' fp32 forward (bit for bit)",
        "GGUF written by quantize loads in transformers' own GGUF loader, logits = gguf-fp32",
    ),
)
